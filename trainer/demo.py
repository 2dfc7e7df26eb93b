"""`rectok demo`: the whole pipeline at toy size on the bundled default dataset, on CPU in minutes.

Tokenizer stage 1 and 2, latent statistics and cache, a guide DiT and a main DiT, samples without
guidance, with CFG and with AutoGuidance, and a report (one PNG and one metrics JSON).
"""
from __future__ import annotations

import json
import os
import time

import torch

from .config import load_config
from .latents import FrozenTokenizer, cache_latents
from .loop import resolve_device, train
from .sampling import sample_from_checkpoint
from .task import save_grid, spread

GUIDANCE = {"none": [], "cfg": ["sample.guidance=cfg", "sample.scale=2.0"],
            "autoguidance": ["sample.guidance=autoguidance", "sample.scale=2.0"]}


def _reconstructions(tokenizer_run: str, dit_cfg, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    from data import take, to_model_range

    from .task import open_split
    val = open_split(dit_cfg, "val")
    x = to_model_range(take(val, spread(len(val), count))[0], torch.device("cpu"))
    tok = FrozenTokenizer(tokenizer_run)
    return x, tok.decode(tok.moments(x)[0])


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
    # AutoGuidance's weaker model: the same small DiT, trained a sixth as long (the paper: S for 30 epochs).
    guide = train(load_config("dit/tiny_dit", dit_common + [
        "run.name=tiny_dit_guide", "schedule.epochs=1", "schedule.decay_start_epoch=0.5",
        "schedule.decay_end_epoch=1", "eval.every_epochs=0"]))
    lap("dit_guide_s")
    main = train(load_config("dit/tiny_dit", dit_common + ["eval.at_start=true"]))
    lap("dit_main_s")

    report = os.path.join(out, "report")
    k = cfg.dit.num_classes
    samples = {}
    for kind, extra in GUIDANCE.items():
        extra = extra + ([f"sample.guide={guide['run_dir']}"] if kind == "autoguidance" else [])
        samples[kind] = sample_from_checkpoint(main["run_dir"], extra, os.path.join(report, f"samples_{kind}"), k)
    lap("sampling_s")
    x, rec = _reconstructions(s2["run_dir"], cfg, k)
    rows = [x, rec] + [samples[g]["images"] for g in GUIDANCE]
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
                "guide_checkpoint": guide["checkpoint"], "train_samples_grid": main["eval/grid"]},
        "samples": {g: {"dir": s["dir"], "npz": s["npz"]} for g, s in samples.items()},
        "wall_seconds": times,
    }
    path = os.path.join(report, "metrics.json")
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    t, d = metrics["tokenizer"], metrics["dit"]
    print("\nDemo finished.")
    print(f"  tokenizer PSNR (EMA): {t['stage1_psnr_ema_before']:.2f} dB untrained -> stage 1 "
          f"{t['stage1_psnr_ema']:.2f} dB -> stage 2 {t['stage2_psnr_ema']:.2f} dB")
    print(f"  DiT fixed-noise flow loss (EMA): {d['fixed_noise_loss_ema_before']:.4f} untrained -> "
          f"{d['fixed_noise_loss_ema']:.4f} (guide model {d['guide_fixed_noise_loss_ema']:.4f})")
    print(f"  wall time: {sum(times.values()):.0f} s ({', '.join(f'{k2} {v}' for k2, v in times.items())})")
    print(f"  report picture: {picture}")
    print(f"  report metrics: {path}")
    return metrics
