"""`rectok demo`: the whole pipeline at toy size on the bundled default dataset, on CPU in minutes.

Tokenizer stage 1 and 2, latent statistics and cache, a guide DiT and a main DiT, samples without
guidance, with CFG and with AutoGuidance and their class accuracy (a classifier trained on the dataset
judges whether each sample shows its class), the evaluation (PSNR, linear probes on clean latents and
on x_t, and FID / IS / precision-recall when Inception weights are at eval.inception_weights), the
pictures of `rectok report`, and a report (report.png, metrics.json, pictures/).
"""
from __future__ import annotations

import os
import time

import torch

from data import evenly_spaced, load_batch, to_model_range
from data.files import write_json
from models.weights import RANDOM
from trainer.config.recipes import load_config
from trainer.engine.distributed import resolve_device
from trainer.evaluation.classifier import class_accuracy
from trainer.evaluation.images import save_grid
from trainer.tasks.class_judge import load_class_judge
from trainer.tasks.latents import FrozenTokenizer, cache_latents
from trainer.tasks.sampling import sample_from_checkpoint
from trainer.tasks.splits import open_split, split_path
from trainer.tasks.training import train

from .evaluate import evaluate_generator, evaluate_tokenizer, linear_probe, reference_stats
from .report import metrics_picture, run_report

CLASS_SAMPLES = 100  # per guidance setting, balanced over the classes: what the class judge scores
GUIDANCE = {"none": [], "cfg": ["sample.guidance=cfg", "sample.scale=2.0"],
            "autoguidance": ["sample.guidance=autoguidance", "sample.scale=2.0"]}


def _reconstructions(tokenizer_run: str, dit_cfg, count: int, judge) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`count` validation images spread over the classes and their reconstructions, and the class judge's
    accuracy on the reconstructions of the whole validation split: the most the generator's samples can
    reach, as they are decoded by the same tokenizer."""
    val = open_split(dit_cfg, "val")
    images, labels = load_batch(val, range(len(val)))
    x = to_model_range(images, torch.device("cpu"))
    tok = FrozenTokenizer(tokenizer_run)
    rec = torch.cat([tok.decode(tok.moments(x[i:i + 64])[0]) for i in range(0, len(x), 64)])
    ids = evenly_spaced(len(val), count)
    return x[ids], rec[ids], class_accuracy(judge.predict(rec), labels)["class_accuracy"]


def _fid(tokenizer_run: str, dit_run: str, cfg, out: str) -> dict:
    """rFID of the tokenizer and gFID / IS / precision-recall of the DiT against the default validation
    split, when Inception weights are there; otherwise why not."""
    weights = cfg.eval.inception_weights
    if weights != RANDOM and not os.path.isfile(weights):
        return {"skipped": f"no Inception weights at {weights}: put pt_inception-2015-12-05-6726825d.pth there or "
                           f"pass eval.inception_weights=PATH (or =random to check the pipeline, ~4 min)"}
    ref = os.path.join(out, "reference_val.npz")
    val = split_path(cfg, "val")
    reference_stats(val, ref, weights, cfg.data.loader, cfg.model.image_size, progress=False)
    over = [f"eval.reference={ref}", f"eval.inception_weights={weights}"]
    n = cfg.eval.num_images
    result = {"tokenizer": evaluate_tokenizer(tokenizer_run, over, n, out, progress=False),
              "generator": evaluate_generator(dit_run, over + ["sample.guidance=cfg", "sample.scale=2.0"], n, out,
                                              progress=False)}
    if weights == RANDOM:
        result["note"] = "Inception with random weights: checks the pipeline; not comparable with published FIDs"
    return result


def run_demo(out: str, overrides: list[str]) -> dict:
    common = [f"run.output_dir={out}"] + list(overrides)
    times, t0 = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        times[name] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()

    s1 = train(load_config("rectok/tiny_stage1", common))
    lap("tokenizer_stage1_s")
    s2 = train(load_config("rectok/tiny_stage2", common + [f"tokenizer.init_from={s1['run_dir']}"]))
    lap("tokenizer_stage2_s")
    dit_common = common + [f"dit.tokenizer={s2['run_dir']}"]
    cfg = load_config("dit/tiny_dit", dit_common)
    cache = cache_latents(cfg, resolve_device(cfg.run.device), batch_size=64)
    lap("stats_and_cache_s")
    # AutoGuidance's weaker model: the same small DiT, trained a ninth as long (the paper: S for 30 epochs), its
    # EMA over about 10 of its 30 steps: at 0.98 the EMA would still hold half the initial weights, a guide
    # worse in every way rather than a weaker version of the main model (class accuracy below unguided).
    guide = train(load_config("dit/tiny_dit", dit_common + [
        "run.name=tiny_dit_guide", "schedule.epochs=1", "schedule.decay_start_epoch=0.5",
        "schedule.decay_end_epoch=1", "eval.every_epochs=0", "ema.decay=0.9"]))
    lap("dit_guide_s")
    main = train(load_config("dit/tiny_dit", dit_common + ["eval.at_start=true"]))
    lap("dit_main_s")

    report = os.path.join(out, "report")
    k = cfg.dit.num_classes
    judge, judge_info = load_class_judge(cfg, torch.device("cpu"))  # trained before the guide DiT's first step
    samples, accuracy = {}, {}
    for kind, extra in GUIDANCE.items():
        extra = extra + ([f"sample.guide={guide['run_dir']}"] if kind == "autoguidance" else [])
        samples[kind] = sample_from_checkpoint(main["run_dir"], extra, os.path.join(report, f"samples_{kind}"),
                                               CLASS_SAMPLES)
        accuracy[kind] = class_accuracy(judge.predict(samples[kind]["images"]), samples[kind]["labels"])
    lap("sampling_s")
    probes = {pool: linear_probe(s2["run_dir"], [], pool=pool, progress=False,
                                 out_dir=os.path.join(report, f"probe_{pool}")) for pool in ("mean", "flatten")}
    fid = _fid(s2["run_dir"], main["run_dir"], cfg, os.path.join(report, "fid"))
    lap("evaluation_s")
    pictures = os.path.join(report, "pictures")
    figures = {"tokenizer": run_report(s2["run_dir"], os.path.join(pictures, "tokenizer"), progress=False),
               "tokenizer_stage1_metrics": metrics_picture(s1["run_dir"], os.path.join(pictures, "stage1_metrics.png"),
                                                           "Tokenizer stage 1: tracked evaluation"),
               "dit": run_report(main["run_dir"], os.path.join(pictures, "dit"), ["sample.guidance=cfg"])}
    lap("pictures_s")
    x, rec, rec_accuracy = _reconstructions(s2["run_dir"], cfg, k, judge)
    rows = [x, rec] + [samples[g]["images"][:k] for g in GUIDANCE]  # image i has class i mod k
    picture = save_grid(os.path.join(report, "report.png"), torch.cat(rows), nrow=k)
    metrics = {
        "picture": picture,
        "picture_rows": ["validation images", "tokenizer reconstructions (stage 2, EMA)",
                         "DiT samples, no guidance", "DiT samples, CFG w=2", "DiT samples, AutoGuidance w=2"],
        "picture_columns": "class 0..9 of the default dataset",
        "tokenizer": {"stage1_psnr_ema_before": s1["at_start"].get("eval/psnr_ema"),
                      "stage1_psnr_ema": s1["eval/psnr_ema"], "stage2_psnr_ema": s2["eval/psnr_ema"],
                      "stage2_psnr_raw": s2["eval/psnr_raw"], "checkpoint": s2["checkpoint"]},
        "latents": {k2: cache[k2] for k2 in ("cache_dir", "count", "stats", "tokenizer_hash")},
        "dit": {"fixed_noise_loss_ema_before": main["at_start"].get("eval/loss_ema"),
                "fixed_noise_loss_ema": main["eval/loss_ema"], "fixed_noise_loss_raw": main["eval/loss_raw"],
                "guide_fixed_noise_loss_ema": guide["eval/loss_ema"], "checkpoint": main["checkpoint"],
                "guide_checkpoint": guide["checkpoint"], "train_samples_grid": main["eval/grid"],
                "class_accuracy": {g: a["class_accuracy"] for g, a in accuracy.items()},
                "class_accuracy_per_class": {g: a["per_class"] for g, a in accuracy.items()},
                "class_accuracy_during_training": main.get("eval/class_accuracy")},
        "class_judge": {"path": judge_info["path"], "held_out_accuracy": judge_info["held_out_accuracy"],
                        "val_images": judge_info["val_images"], "on_reconstructions": rec_accuracy,
                        "samples_per_setting": CLASS_SAMPLES, "chance": 1 / k},
        "samples": {g: {"dir": s["dir"], "npz": s["npz"]} for g, s in samples.items()},
        "linear_probe": {pool: {key: p[key] for key in ("top1_clean", "top1_t0.5", "chance", "train_images",
                                                      "val_images", "path")} for pool, p in probes.items()},
        "fid": fid,
        "pictures": figures,
        "wall_seconds": times,
    }
    path = write_json(os.path.join(report, "metrics.json"), metrics, indent=2)
    t, d = metrics["tokenizer"], metrics["dit"]
    print("\nDemo finished.")
    print(f"  tokenizer PSNR (EMA): {t['stage1_psnr_ema_before']:.2f} dB untrained -> stage 1 "
          f"{t['stage1_psnr_ema']:.2f} dB -> stage 2 {t['stage2_psnr_ema']:.2f} dB")
    print(f"  DiT fixed-noise flow loss (EMA): {d['fixed_noise_loss_ema_before']:.4f} untrained -> "
          f"{d['fixed_noise_loss_ema']:.4f} (guide model {d['guide_fixed_noise_loss_ema']:.4f})")
    j = metrics["class_judge"]
    print(f"  class accuracy of {CLASS_SAMPLES} samples: " + ", ".join(f"{g} {a:.2f}" for g, a in
                                                                     d["class_accuracy"].items())
          + f" (chance {j['chance']:.2f}; the judge: {j['held_out_accuracy']:.3f} on held-out images, "
          f"{j['on_reconstructions']:.3f} on the tokenizer's reconstructions)")
    for pool, p in metrics["linear_probe"].items():
        print(f"  linear probe ({pool} tokens): top-1 {p['top1_clean']:.3f} on clean latents, "
              f"{p['top1_t0.5']:.3f} on x_t at t = 0.5 (chance {p['chance']:.3f})")
    if "skipped" in fid:
        print(f"  FID: skipped ({fid['skipped']})")
    else:
        print(f"  rFID (EMA) {fid['tokenizer']['rfid_ema']:.2f}, gFID (CFG w=2) {fid['generator']['gfid']:.2f}, "
              f"IS {fid['generator']['inception_score']:.2f}" + (f" [{fid['note']}]" if "note" in fid else ""))
    print(f"  pictures: {pictures}")
    print(f"  wall time: {sum(times.values()):.0f} s ({', '.join(f'{k2} {v}' for k2, v in times.items())})")
    print(f"  report picture: {picture}")
    print(f"  report metrics: {path}")
    return metrics
