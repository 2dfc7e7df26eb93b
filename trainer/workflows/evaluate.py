"""`rectok eval`: reference statistics of a dataset, rFID / rsFID and PSNR of a tokenizer, gFID / sFID / IS /
precision / recall of a DiT checkpoint's samples by the paper's protocol (docs/reference.md §4): balanced
labels, images quantised by truncation, torch-fidelity's FID Inception-v3, ADM-format reference
statistics; and linear probes of a tokenizer's latents.

Under torchrun each rank takes a contiguous share of the images or sample indices (every one
exactly once) and the Inception features are gathered in index order, so the numbers do not depend
on the number of ranks. Samples are generated and featurised a batch at a time: 50K samples never
sit in memory, only their features do. Every number is written with the settings that produced it.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch
from tqdm import tqdm

from data import eval_batches, evenly_spaced, load_batch, open_images, to_model_range
from data.files import write_json
from trainer.config.tree import ConfigError
from trainer.engine.checkpoint import resolve_checkpoint, saved_config
from trainer.engine.distributed import env_from_launcher, gather_rows, join_process_group, resolve_device
from trainer.engine.preemption import config_hash
from trainer.engine.tracking import bar_disabled
from trainer.evaluation.classifier import class_accuracy
from trainer.evaluation.fidelity import (
    Inception,
    frechet_distance,
    inception_score,
    load_spatial_stats,
    load_stats,
    precision_recall,
    reference_features,
    save_stats,
    sharded_inception,
    statistics,
)
from trainer.evaluation.images import psnr, to_uint8_images
from trainer.evaluation.probe import encode_split, fit_linear_probe, noised, pooled, standardise
from trainer.tasks.class_judge import load_class_judge, prepare_class_judge
from trainer.tasks.latents import FrozenTokenizer
from trainer.tasks.sampling import balanced_labels, load_sampler
from trainer.tasks.splits import open_split

log = logging.getLogger("rectok")

PR_FEATURES = 10_000  # reference features kept for precision / recall (ADM's reference batch is 10K images)
SFID_NOTE = ("the reference file holds no spatial statistics (mu_s, sigma_s; written before sFID): sFID not "
             "computed (rectok eval ref-stats writes them)")


def reference_stats(data: str, out: str, weights: str, loader: str = "ffcv", image_size: int = 256,
                    batch: int = 100, device: str = "auto", keep: int = PR_FEATURES, progress: bool = True) -> dict:
    """Statistics (mu, sigma) of a dataset's images and (mu_s, sigma_s) of their spatial features (sFID), plus
    up to `keep` of their features (a seeded random subset) for precision and recall; written as an ADM-layout
    .npz (by rank 0 under torchrun)."""
    env = env_from_launcher()
    net = Inception(weights, join_process_group(env, device))
    source = open_images(data, loader, image_size)
    features, _, spatial = sharded_inception(len(source), batch, lambda ids: load_batch(source, ids)[0], net,
                                             progress and env.main, "inception", spatial=True)
    mu, sigma = statistics(features)
    mu_s, sigma_s = statistics(spatial)
    pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:keep].sort().values
    if env.main:
        save_stats(out, mu, sigma, mu_s, sigma_s, features=features[pick].float().numpy(), count=len(features))
    return {"reference": out, "images": len(features), "features_kept": len(pick), "source": data,
            "ranks": env.world}


def write_result(result: dict, out_dir: str | None, name: str, main: bool = True) -> dict:
    """`result` as OUT/name (by rank 0), its path recorded in it."""
    if out_dir:
        result["path"] = os.path.join(out_dir, name)
        if main:
            write_json(result["path"], result)
    return result


def evaluate_generator(checkpoint: str, overrides: list[str], num_images: int, out_dir: str | None = None,
                       use_ema: bool = True, progress: bool = True) -> dict:
    """gFID, sFID, IS, precision and recall of `num_images` samples with balanced labels (50 per class for
    50K at 1000 classes), against `eval.reference`, and their class accuracy when eval.classifier names a
    class judge; written to OUT/eval_generator.json."""
    t0 = time.perf_counter()
    env = env_from_launcher()
    sampler = load_sampler(checkpoint, overrides, use_ema)
    join_process_group(env, sampler.cfg.run.device)
    cfg = sampler.cfg
    ref_mu, ref_sigma = load_stats(cfg.eval.reference)  # before sampling: a bad path fails at once
    ref_spatial = load_spatial_stats(cfg.eval.reference)  # None for a file written before sFID
    net = Inception(cfg.eval.inception_weights, sampler.device)
    prepare_class_judge(cfg, sampler.device)
    judge, judge_info = load_class_judge(cfg, sampler.device)
    labels = balanced_labels(num_images, cfg.dit.num_classes)
    judged: dict[int, int] = {}  # sample id -> class the judge sees (a rank's padding repeats an id)
    # A requeued job (a preemption) resumes after the samples already featurised, when they were made the same way.
    settings = json.dumps({"checkpoint": resolve_checkpoint(checkpoint), "sampler": sampler.settings(),
                           "num_images": num_images, "weights": use_ema, "judge": judge is not None}, sort_keys=True,
                          default=str)
    resume = os.path.join(out_dir, f".featurised_generator_{config_hash(settings)}") if out_dir else None

    def samples(idx: list[int]) -> torch.Tensor:
        images = to_uint8_images(sampler(labels[idx], idx))
        if judge is not None:  # judged as saved and as Inception sees them: quantised
            judged.update(zip(idx, judge.predict(images.float() / 127.5 - 1).tolist()))
        return images

    features, logits, *spatial = sharded_inception(num_images, cfg.sample.batch_size, samples, net,
                                                   progress and env.main, "gFID samples",
                                                   spatial=ref_spatial is not None, resume=resume,
                                                   state={"judged": judged})
    gen_mu, gen_sigma = statistics(features)
    sfid = frechet_distance(*statistics(spatial[0]), *ref_spatial) if ref_spatial is not None else None
    is_mean, is_std = inception_score(logits)
    ref_features = reference_features(cfg.eval.reference, net)
    precision, recall = precision_recall(ref_features, features) if ref_features is not None else (None, None)
    result = {"gfid": frechet_distance(gen_mu, gen_sigma, ref_mu, ref_sigma), "sfid": sfid, "inception_score": is_mean,
              "inception_score_std": is_std, "precision": precision, "recall": recall,
              "num_images": num_images, "labels": "balanced (image i has class i mod K)",
              "sampler": sampler.settings(), "weights": "ema" if use_ema else "raw", "checkpoint": checkpoint,
              "reference": cfg.eval.reference, "inception_weights": cfg.eval.inception_weights, "ranks": env.world,
              "seconds": round(time.perf_counter() - t0, 1)}
    if judge is not None:
        mine = torch.tensor([judged[i] for i in sorted(judged)], dtype=torch.long)
        predicted = gather_rows(mine)  # shares are contiguous: rank order is sample order
        scores = class_accuracy(predicted, labels)
        result.update(class_accuracy=scores["class_accuracy"], class_accuracy_per_class=scores["per_class"],
                      class_judge={k: judge_info[k] for k in ("path", "held_out_accuracy", "val_images")})
    notes = []
    if ref_spatial is None:
        notes.append(SFID_NOTE)
    if ref_features is None:
        notes.append("the reference file holds no features or images: precision and recall not computed")
    if notes:
        result["note"] = "; ".join(notes)
    log.info("gFID %.4g, sFID %s, IS %.4g, precision %s, recall %s, class accuracy %s (%d samples)", result["gfid"],
             sfid, is_mean, precision, recall, result.get("class_accuracy"), num_images)
    return write_result(result, out_dir, "eval_generator.json", env.main)


def evaluate_tokenizer(checkpoint: str, overrides: list[str], num_images: int = 0, out_dir: str | None = None,
                       batch: int = 50, progress: bool = True) -> dict:
    """rFID and rsFID (against `eval.reference`: statistics of the same validation images; rsFID when the file
    holds spatial statistics) and PSNR on [0, 1] images of the reconstructions of the validation set
    (`num_images` spread over the classes; 0 = all), for the raw and the EMA weights; written to
    OUT/eval_tokenizer.json."""
    t0 = time.perf_counter()
    env = env_from_launcher()
    cfg = saved_config(checkpoint, overrides, task="tokenizer")
    device = join_process_group(env, cfg.run.device)
    ref_mu, ref_sigma = load_stats(cfg.eval.reference)
    ref_spatial = load_spatial_stats(cfg.eval.reference)  # None for a file written before sFID
    net = Inception(cfg.eval.inception_weights, device)
    tokenizers = {k: FrozenTokenizer(checkpoint, use_ema=k == "ema").to(device) for k in ("raw", "ema")}
    val = open_split(cfg, "val")
    n = min(num_images or len(val), len(val))
    ids = evenly_spaced(len(val), n)  # validation sets are sorted by class: the first N would cover N/50 classes
    batches = [[ids[i] for i in share] for share in eval_batches(n, batch, env.rank, env.world)]
    scores = {k: [] for k in tokenizers}
    features = {k: [] for k in tokenizers}
    spatial = {k: [] for k in tokenizers}
    for images, _, _ in tqdm(val.batches(batches, cfg.data.num_workers), total=len(batches), desc="reconstructions",
                             disable=bar_disabled(progress and env.main), dynamic_ncols=True):
        x = to_model_range(images, device)
        for k, tok in tokenizers.items():
            rec = tok.decode(tok.moments(x)[0])
            scores[k].append(psnr(rec * 0.5 + 0.5, x * 0.5 + 0.5).double().cpu())
            feats, _, spatial_feats = net.extract(to_uint8_images(rec))
            features[k].append(feats)
            if ref_spatial is not None:  # kept only when used (float32, 8 KB an image)
                spatial[k].append(spatial_feats)
    result = {"num_images": n, "checkpoint": resolve_checkpoint(checkpoint), "reference": cfg.eval.reference,
              "inception_weights": cfg.eval.inception_weights, "val": cfg.data.val or "the default dataset",
              "ranks": env.world}
    for k in tokenizers:
        feats, values = gather_rows(torch.cat(features[k])), gather_rows(torch.cat(scores[k]))
        result[f"rfid_{k}"] = frechet_distance(*statistics(feats), ref_mu, ref_sigma)
        result[f"rsfid_{k}"] = (frechet_distance(*statistics(gather_rows(torch.cat(spatial[k]))), *ref_spatial)
                                if ref_spatial is not None else None)
        result[f"psnr_{k}"] = values.mean().item()
    if ref_spatial is None:
        result["note"] = SFID_NOTE.replace("sFID not", "rsFID not")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("rFID raw %.4g / EMA %.4g, PSNR raw %.4g / EMA %.4g dB (%d images)", result["rfid_raw"],
             result["rfid_ema"], result["psnr_raw"], result["psnr_ema"], n)
    return write_result(result, out_dir, "eval_tokenizer.json", env.main)


def linear_probe(checkpoint: str, overrides: list[str], t: float = 0.5, num_train: int = 0, num_val: int = 0,
                 pool: str = "mean", epochs: int = 100, batch: int = 64, use_ema: bool = True,
                 progress: bool = True, out_dir: str | None = None) -> dict:
    """Top-1 of linear probes on clean latents and on x_t, trained on the train split, tested on val;
    written to OUT/eval_probe.json."""
    if not 0 <= t <= 1:
        raise ConfigError(f"--t must lie in [0, 1] (1 = data, 0 = noise), got {t}")
    cfg = saved_config(checkpoint, overrides, task="tokenizer")
    device = resolve_device(cfg.run.device)
    tok = FrozenTokenizer(checkpoint, use_ema).to(device)
    splits = {}
    for name, count in (("train", num_train), ("val", num_val)):
        source = open_split(cfg, name)
        # Spread over the split, which is sorted by class: the first N images would be a few classes.
        splits[name] = encode_split(tok, source, evenly_spaced(len(source), count or len(source)), batch, device,
                                    cfg.data.num_workers, progress)
    (z_train, y_train), (z_val, y_val) = splits["train"], splits["val"]
    z_train, z_val = standardise(z_train, z_train, z_val)
    classes = int(max(y_train.max(), y_val.max())) + 1
    out = {"checkpoint": tok.path, "weights": "ema" if use_ema else "raw", "pool": pool, "t": t,
           "train_images": len(z_train), "val_images": len(z_val), "classes": classes, "chance": 1 / classes}
    out["top1_clean"] = fit_linear_probe(pooled(z_train, pool), y_train, pooled(z_val, pool), y_val, classes, epochs)
    out[f"top1_t{t:g}"] = fit_linear_probe(pooled(noised(z_train, t, 1), pool), y_train,
                                           pooled(noised(z_val, t, 2), pool), y_val, classes, epochs)
    log.info("linear probe (%s): top-1 %.3f on clean latents, %.3f at t = %g (chance %.3f)", pool,
             out["top1_clean"], out[f"top1_t{t:g}"], t, out["chance"])
    return write_result(out, out_dir, "eval_probe.json")
