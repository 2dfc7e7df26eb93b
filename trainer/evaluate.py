"""`rectok eval`: reference statistics of a dataset, and gFID / IS / precision / recall of a DiT
checkpoint's samples by the paper's protocol (SPEC 4): balanced labels, images quantised by
truncation, torch-fidelity's FID Inception-v3, ADM-format reference statistics.

Samples are generated and featurised a batch at a time, so 50K samples never sit in memory (only
their 2048-d features do). Every number is written with the sampler settings that produced it.
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from data import eval_batches, open_images

from .fidelity import Inception, frechet_distance, inception_score, load_stats, precision_recall, save_stats, statistics
from .sampling import balanced_labels, load_sampler, quantize

log = logging.getLogger("rectok")

PR_FEATURES = 10_000  # reference features kept for precision / recall (ADM's reference batch is 10K images)


def dataset_features(source, net: Inception, batch: int, rank: int = 0, world: int = 1,
                     progress: bool = True) -> torch.Tensor:
    """Inception pool features of every image of `source` (this rank's share), in order."""
    batches = eval_batches(len(source), batch, rank, world)
    out = []
    for images, _, _ in tqdm(source.batches(batches, 0), total=len(batches), desc="inception",
                             disable=not progress, dynamic_ncols=True):
        out.append(net(images)[0])
    return torch.cat(out)


def reference_stats(data: str, out: str, weights: str, loader: str = "ffcv", image_size: int = 256,
                    batch: int = 100, device: str = "cpu", keep: int = PR_FEATURES, progress: bool = True) -> dict:
    """Statistics (mu, sigma) of a dataset's images, plus up to `keep` of their features (a seeded
    random subset) for precision and recall; written as an ADM-layout .npz."""
    source = open_images(data, loader, image_size)
    net = Inception(weights, device)
    features = dataset_features(source, net, batch, progress=progress)
    mu, sigma = statistics(features)
    pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:keep].sort().values
    save_stats(out, mu, sigma, features=features[pick].float().numpy(), count=len(features))
    return {"reference": out, "images": len(features), "features_kept": len(pick), "source": data}


def reference_features(path: str, net: Inception, batch: int = 100) -> np.ndarray | None:
    """Features for precision / recall: ours are stored; ADM's files hold images (`arr_0`) instead."""
    with np.load(path) as f:
        if "features" in f.files:
            return f["features"]
        if "arr_0" in f.files and f["arr_0"].ndim == 4:
            images = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous()
            return torch.cat([net(images[s:s + batch])[0] for s in range(0, len(images), batch)]).numpy()
    return None


def evaluate_generator(checkpoint: str, overrides: list[str], num_images: int, out_dir: str | None = None,
                       use_ema: bool = True, progress: bool = True) -> dict:
    """gFID, IS, precision and recall of `num_images` samples with balanced labels (50 per class for
    50K at 1000 classes), against `eval.reference`; written to OUT/eval_generator.json."""
    t0 = time.perf_counter()
    sampler = load_sampler(checkpoint, overrides, use_ema)
    cfg = sampler.cfg
    ref_mu, ref_sigma = load_stats(cfg.eval.reference)  # before sampling: a bad path fails at once
    net = Inception(cfg.eval.inception_weights, sampler.device)
    labels = balanced_labels(num_images, cfg.dit.num_classes)
    features, logits = [], []
    step = cfg.sample.batch_size
    for s in tqdm(range(0, num_images, step), desc="gFID samples", disable=not progress, dynamic_ncols=True):
        idx = range(s, min(s + step, num_images))
        f, lg = net(quantize(sampler(labels[s:s + step], idx)))
        features.append(f)
        logits.append(lg)
    features, logits = torch.cat(features), torch.cat(logits)
    gen_mu, gen_sigma = statistics(features)
    is_mean, is_std = inception_score(logits)
    ref_features = reference_features(cfg.eval.reference, net)
    precision, recall = precision_recall(ref_features, features) if ref_features is not None else (None, None)
    result = {"gfid": frechet_distance(gen_mu, gen_sigma, ref_mu, ref_sigma), "inception_score": is_mean,
              "inception_score_std": is_std, "precision": precision, "recall": recall,
              "num_images": num_images, "labels": "balanced (image i has class i mod K)",
              "sampler": sampler.settings(), "weights": "ema" if use_ema else "raw", "checkpoint": checkpoint,
              "reference": cfg.eval.reference, "inception_weights": cfg.eval.inception_weights,
              "seconds": round(time.perf_counter() - t0, 1)}
    if ref_features is None:
        result["note"] = "the reference file holds no features or images: precision and recall not computed"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        result["path"] = os.path.join(out_dir, "eval_generator.json")
        with open(result["path"], "w") as f:
            json.dump(result, f, indent=1)
    log.info("gFID %.4g, IS %.4g, precision %s, recall %s (%d samples)", result["gfid"], is_mean, precision, recall,
             num_images)
    return result
