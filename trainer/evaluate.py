"""`rectok eval`: reference statistics of a dataset, rFID and PSNR of a tokenizer, and gFID / IS /
precision / recall of a DiT checkpoint's samples by the paper's protocol (SPEC 4): balanced labels,
images quantised by truncation, torch-fidelity's FID Inception-v3, ADM-format reference statistics.

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

import numpy as np
import torch
from tqdm import tqdm

from data import eval_batches, open_images, take, to_model_range

from .checkpoint import read_meta, resolve_checkpoint
from .config import TrainConfig, parse_saved_config, validate
from .config_tree import apply_overrides, from_dict, to_dict
from .distributed import DistEnv, device_for, env_from_launcher, gather_rows, init_distributed
from .fidelity import Inception, frechet_distance, inception_score, load_stats, precision_recall, save_stats, statistics
from .sampling import balanced_labels, load_sampler, quantize

log = logging.getLogger("rectok")

PR_FEATURES = 10_000  # reference features kept for precision / recall (ADM's reference batch is 10K images)


def reference_stats(data: str, out: str, weights: str, loader: str = "ffcv", image_size: int = 256,
                    batch: int = 100, device: str = "auto", keep: int = PR_FEATURES, progress: bool = True) -> dict:
    """Statistics (mu, sigma) of a dataset's images, plus up to `keep` of their features (a seeded
    random subset) for precision and recall; written as an ADM-layout .npz (by rank 0 under torchrun)."""
    env = env_from_launcher()
    net = Inception(weights, _join(env, device))
    source = open_images(data, loader, image_size)
    features, _ = sharded_inception(len(source), batch, lambda ids: take(source, ids)[0], net,
                                    progress and env.main, "inception")
    mu, sigma = statistics(features)
    pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:keep].sort().values
    if env.main:
        save_stats(out, mu, sigma, features=features[pick].float().numpy(), count=len(features))
    return {"reference": out, "images": len(features), "features_kept": len(pick), "source": data,
            "ranks": env.world}


def reference_features(path: str, net: Inception, batch: int = 100) -> np.ndarray | None:
    """Features for precision / recall: ours are stored; ADM's files hold images (`arr_0`) instead."""
    with np.load(path) as f:
        if "features" in f.files:
            return f["features"]
        if "arr_0" in f.files and f["arr_0"].ndim == 4:
            images = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous()
            return torch.cat([net(images[s:s + batch])[0] for s in range(0, len(images), batch)]).numpy()
    return None


def sharded_inception(n: int, batch: int, images_for, net: Inception, progress: bool = False,
                      desc: str = "inception") -> tuple[torch.Tensor, torch.Tensor]:
    """Inception (features, logits) of images 0..n-1, `images_for(ids)` giving uint8 images. Each rank
    takes its contiguous share; shorter shares repeat their last id so every rank makes the same number
    of calls (sharded models need every rank in every forward); repeats are dropped before gathering."""
    from .distributed import rank_and_world
    rank, world = rank_and_world()
    mine = eval_batches(n, batch, rank, world)
    real = len(mine)
    calls = max(len(eval_batches(n, batch, r, world)) for r in range(world))
    mine += [[mine[-1][-1] if mine else 0]] * (calls - real)
    features, logits = [], []
    for i, ids in enumerate(tqdm(mine, desc=desc, disable=not progress, dynamic_ncols=True)):
        f, lg = net(images_for(ids))
        features.append(f if i < real else f[:0])
        logits.append(lg if i < real else lg[:0])
    return gather_rows(torch.cat(features)), gather_rows(torch.cat(logits))


class TrackedFID:
    """The FID a training run tracks at each evaluation (eval.fid_images images): Inception and the
    reference are loaded at the first use and kept."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device, self.net, self.ref = cfg, device, None, None

    def __call__(self, n: int, images_for, batch: int) -> float:
        if self.net is None:
            self.ref = load_stats(self.cfg.eval.reference)
            self.net = Inception(self.cfg.eval.inception_weights, self.device)
        features, _ = sharded_inception(n, batch, images_for, self.net)
        return frechet_distance(*statistics(features), *self.ref)


def _join(env: DistEnv, device_name: str) -> torch.device:
    """This process's device, in the launcher's process group when there are several ranks."""
    from .loop import resolve_device
    device = device_for(env, resolve_device(device_name))
    init_distributed(env, device, need_group=False)
    return device


def write_result(result: dict, out_dir: str | None, name: str, main: bool = True) -> dict:
    """`result` as OUT/name (by rank 0), its path recorded in it."""
    if out_dir:
        result["path"] = os.path.join(out_dir, name)
        if main:
            os.makedirs(out_dir, exist_ok=True)
            with open(result["path"], "w") as f:
                json.dump(result, f, indent=1)
    return result


def evaluate_generator(checkpoint: str, overrides: list[str], num_images: int, out_dir: str | None = None,
                       use_ema: bool = True, progress: bool = True) -> dict:
    """gFID, IS, precision and recall of `num_images` samples with balanced labels (50 per class for
    50K at 1000 classes), against `eval.reference`; written to OUT/eval_generator.json."""
    t0 = time.perf_counter()
    env = env_from_launcher()
    sampler = load_sampler(checkpoint, overrides, use_ema)
    _join(env, sampler.cfg.run.device)
    cfg = sampler.cfg
    ref_mu, ref_sigma = load_stats(cfg.eval.reference)  # before sampling: a bad path fails at once
    net = Inception(cfg.eval.inception_weights, sampler.device)
    labels = balanced_labels(num_images, cfg.dit.num_classes)
    features, logits = sharded_inception(num_images, cfg.sample.batch_size,
                                         lambda idx: quantize(sampler(labels[idx], idx)), net,
                                         progress and env.main, "gFID samples")
    gen_mu, gen_sigma = statistics(features)
    is_mean, is_std = inception_score(logits)
    ref_features = reference_features(cfg.eval.reference, net)
    precision, recall = precision_recall(ref_features, features) if ref_features is not None else (None, None)
    result = {"gfid": frechet_distance(gen_mu, gen_sigma, ref_mu, ref_sigma), "inception_score": is_mean,
              "inception_score_std": is_std, "precision": precision, "recall": recall,
              "num_images": num_images, "labels": "balanced (image i has class i mod K)",
              "sampler": sampler.settings(), "weights": "ema" if use_ema else "raw", "checkpoint": checkpoint,
              "reference": cfg.eval.reference, "inception_weights": cfg.eval.inception_weights, "ranks": env.world,
              "seconds": round(time.perf_counter() - t0, 1)}
    if ref_features is None:
        result["note"] = "the reference file holds no features or images: precision and recall not computed"
    log.info("gFID %.4g, IS %.4g, precision %s, recall %s (%d samples)", result["gfid"], is_mean, precision, recall,
             num_images)
    return write_result(result, out_dir, "eval_generator.json", env.main)


def tokenizer_config(checkpoint: str, overrides: list[str]) -> TrainConfig:
    """A tokenizer checkpoint's saved config with `overrides` (data.*, eval.*, run.device) applied."""
    meta = read_meta(resolve_checkpoint(checkpoint))
    cfg = from_dict(TrainConfig, apply_overrides(to_dict(parse_saved_config(meta["config"])), list(overrides)))
    if cfg.task != "tokenizer":
        from .config import ConfigError
        raise ConfigError(f"{checkpoint} holds a {cfg.task!r} run; `rectok eval tokenizer` reads tokenizer runs")
    validate(cfg)
    return cfg


def evaluate_tokenizer(checkpoint: str, overrides: list[str], num_images: int = 0, out_dir: str | None = None,
                       batch: int = 50, progress: bool = True) -> dict:
    """rFID (against `eval.reference`: statistics of the same validation images) and PSNR on [0, 1]
    images of the reconstructions of the validation set (`num_images` spread over the classes; 0 = all), for the
    raw and the EMA weights; written to OUT/eval_tokenizer.json."""
    from .latents import FrozenTokenizer
    from .task import open_split, spread
    from .tokenizer_task import psnr
    t0 = time.perf_counter()
    env = env_from_launcher()
    cfg = tokenizer_config(checkpoint, overrides)
    device = _join(env, cfg.run.device)
    ref_mu, ref_sigma = load_stats(cfg.eval.reference)
    net = Inception(cfg.eval.inception_weights, device)
    tokenizers = {k: FrozenTokenizer(checkpoint, use_ema=k == "ema").to(device) for k in ("raw", "ema")}
    val = open_split(cfg, "val")
    n = min(num_images or len(val), len(val))
    ids = spread(len(val), n)  # validation sets are sorted by class: the first N would cover N/50 classes
    batches = [[ids[i] for i in share] for share in eval_batches(n, batch, env.rank, env.world)]
    scores = {k: [] for k in tokenizers}
    features = {k: [] for k in tokenizers}
    for images, _, _ in tqdm(val.batches(batches, cfg.data.num_workers), total=len(batches), desc="reconstructions",
                             disable=not (progress and env.main), dynamic_ncols=True):
        x = to_model_range(images, device)
        for k, tok in tokenizers.items():
            rec = tok.decode(tok.moments(x)[0])
            scores[k].append(psnr(rec * 0.5 + 0.5, x * 0.5 + 0.5).double().cpu())
            features[k].append(net(quantize(rec))[0])
    result = {"num_images": n, "checkpoint": resolve_checkpoint(checkpoint), "reference": cfg.eval.reference,
              "inception_weights": cfg.eval.inception_weights, "val": cfg.data.val or "the default dataset",
              "ranks": env.world}
    for k in tokenizers:
        feats, values = gather_rows(torch.cat(features[k])), gather_rows(torch.cat(scores[k]))
        result[f"rfid_{k}"] = frechet_distance(*statistics(feats), ref_mu, ref_sigma)
        result[f"psnr_{k}"] = values.mean().item()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("rFID raw %.4g / EMA %.4g, PSNR raw %.4g / EMA %.4g dB (%d images)", result["rfid_raw"],
             result["rfid_ema"], result["psnr_raw"], result["psnr_ema"], n)
    return write_result(result, out_dir, "eval_tokenizer.json", env.main)
