"""What the generic loop (trainer/loop.py) needs from a task, and the pieces tasks share.

A task owns its models, its training data and its losses:
  players          [Player]: parameter sets, each with its own optimizer, stepped in list order
  model            the module the EMA follows and evaluation samples from
  train_set        len(), labels and batches(index_lists, num_workers) -> (inputs, labels, ids)
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


def split_path(cfg: TrainConfig, split: str) -> str:
    """data.train / data.val, or the bundled default dataset's split for data.loader (made on first use)."""
    from data import default_split
    return getattr(cfg.data, split) or default_split(
        os.path.expanduser(cfg.data.default_dataset_dir), split, cfg.data.loader, cfg.model.image_size,
        per_class_train=cfg.data.default_per_class)


def open_split(cfg: TrainConfig, split: str):
    """The configured loader over one split (see data/sources.py for what it yields), or random images
    of its shape and ImageNet's length with data.synthetic."""
    if cfg.data.synthetic:
        from data.synthetic import IMAGENET_TRAIN, IMAGENET_VAL, synthetic_images
        return synthetic_images(cfg.model.image_size, IMAGENET_TRAIN if split == "train" else IMAGENET_VAL)
    from data import open_images
    return open_images(split_path(cfg, split), cfg.data.loader, cfg.model.image_size, cfg.data.ffcv_os_cache)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def enlarged(images: torch.Tensor, min_side: int) -> torch.Tensor:
    """[N, C, H, W] as float, enlarged by an integer factor (nearest) to about min_side pixels, so tiny
    images can be looked at."""
    x = images.float()
    if x.shape[-1] < min_side:
        x = F.interpolate(x, scale_factor=min_side // x.shape[-1], mode="nearest")
    return x


def save_grid(path: str, images: torch.Tensor, nrow: int = 8) -> str:
    """Images in [-1, 1] as one PNG, enlarged to 128 px."""
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image((enlarged(images, 128) * 0.5 + 0.5).clamp(0, 1), path, nrow=nrow, padding=2)
    return path


def build_task(cfg: TrainConfig, device: torch.device, main: bool = True):
    """`main`: this process writes the shared files (pictures); every rank computes."""
    if cfg.task == "dit":
        from .dit_task import DiTTask
        return DiTTask(cfg, device, main)
    from .tokenizer_task import TokenizerTask
    return TokenizerTask(cfg, device, main)
