"""What the generic loop (trainer/loop.py) needs from a task, and the pieces tasks share.

A task owns its models, its training data and its losses:
  players          [Player]: parameter sets, each with its own optimizer, stepped in list order
  model            the module the EMA follows and evaluation samples from
  train_set        a Dataset yielding (input, label, index)
  prepare(x, y)    one micro-batch of loader data -> tuple of device tensors (random flips drawn here)
  losses(inputs, step) -> ({player: loss}, {term: value}) for one micro-batch
  evaluate(ema_model, step, batch_size) -> {metric: value}  (every rank runs it; only `main` writes files)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig


@dataclass
class Player:
    """A set of trained parameters with its own optimizer."""
    name: str
    module: nn.Module
    start_epoch: float = 0.0  # skipped before this epoch (the discriminator's late start)
    start_step: int = 0       # start_epoch in optimizer steps, set by the loop once it knows the epoch length


def spread(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n) (datasets are sorted by class: this covers them all)."""
    return torch.linspace(0, n - 1, min(n, count)).round().long().unique().tolist()


def dataset_root(cfg: TrainConfig) -> str:
    """data.path, or the bundled default dataset (generated on first use)."""
    from data import ensure_default_dataset
    if cfg.data.path:
        return cfg.data.path
    return ensure_default_dataset(os.path.expanduser(cfg.data.default_dataset_dir), cfg.model.image_size,
                                  per_class_train=cfg.data.default_per_class)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def save_grid(path: str, images: torch.Tensor, nrow: int = 8) -> str:
    """Images in [-1, 1] as one PNG; small images are enlarged so the picture can be looked at."""
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x = images.float() * 0.5 + 0.5
    if x.shape[-1] < 128:
        x = F.interpolate(x, scale_factor=128 // x.shape[-1], mode="nearest")
    save_image(x.clamp(0, 1), path, nrow=nrow, padding=2)
    return path


def build_task(cfg: TrainConfig, device: torch.device, main: bool = True):
    """`main`: this process writes the shared files (pictures); every rank computes."""
    if cfg.task == "dit":
        from .dit_task import DiTTask
        return DiTTask(cfg, device, main)
    from .tokenizer_task import TokenizerTask
    return TokenizerTask(cfg, device, main)
