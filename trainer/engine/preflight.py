"""Pre-flight checks: every local file a run will read exists before anything is written or built.

A missing teacher, perceptual-network or Inception weight file, checkpoint, dataset or FID reference
fails here with the config key that names it, not minutes into set-up on every rank.
"""
from __future__ import annotations

import os

from data.ffcv_loader import require_ffcv
from models.weight_manifest import fetch_hint
from models.weights import require_weights
from trainer.config.schema import TrainConfig, uses_teacher

from .checkpoint import resolve_checkpoint


def check_files(cfg: TrainConfig) -> None:
    """Every local file the run will read exists: a missing one fails now, not after set-up."""
    wanted, checkpoints = [], []
    if cfg.task == "tokenizer":
        if uses_teacher(cfg):
            wanted.append(("teacher.weights", cfg.teacher.weights))
        if cfg.loss.perceptual_weight > 0:
            wanted.append(("loss.lpips_vgg_weights", cfg.loss.lpips_vgg_weights))
            if cfg.loss.convnext_weight > 0:
                wanted.append(("loss.convnext_weights", cfg.loss.convnext_weights))
        if cfg.tokenizer.stage == 2 and not cfg.data.synthetic:
            checkpoints.append(("tokenizer.init_from", cfg.tokenizer.init_from))
    elif not cfg.data.synthetic:
        checkpoints.append(("dit.tokenizer", cfg.dit.tokenizer))
        if cfg.dit.init_from:
            checkpoints.append(("dit.init_from", cfg.dit.init_from))
    if cfg.sample.guidance == "autoguidance":
        checkpoints.append(("sample.guide", cfg.sample.guide))
    for key, path in wanted:
        require_weights(path, key.split(".")[0], key)
    for key, path in checkpoints:
        try:
            resolve_checkpoint(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{key}: {e}") from None
    reads_images = not cfg.data.synthetic and (cfg.task == "tokenizer" or cfg.dit.latents == "online")
    for split in ("train", "val"):
        path = getattr(cfg.data, split)
        if path and not cfg.data.synthetic and not os.path.exists(path):
            raise FileNotFoundError(f"data.{split}: dataset not found: {path}")
    if cfg.eval.fid_images:  # FID tracking during training (eval.fid_images = 0 turns it off)
        require_weights(cfg.eval.inception_weights, "Inception-v3 (FID)", "eval.inception_weights")
        if not os.path.isfile(cfg.eval.reference):
            raise FileNotFoundError(f"eval.reference: FID reference statistics not found: {cfg.eval.reference} "
                                    f"(`rectok eval ref-stats` writes them; eval.fid_images=0 turns FID tracking "
                                    f"off).{fetch_hint(cfg.eval.reference)}")
    if reads_images and cfg.data.loader == "ffcv":
        require_ffcv()
