"""The configured dataset splits: data.train / data.val, or the bundled default dataset, opened with
data.loader, or random inputs of the training shapes with data.synthetic."""
from __future__ import annotations

import os

from data import default_split, open_images
from data.synthetic import IMAGENET_TRAIN, IMAGENET_VAL, synthetic_images
from trainer.config.schema import TrainConfig
from trainer.engine.protocols import TrainingSet


def split_path(cfg: TrainConfig, split: str) -> str:
    """data.train / data.val, or the bundled default dataset's split for data.loader (made on first use)."""
    return getattr(cfg.data, split) or default_split(
        os.path.expanduser(cfg.data.default_dataset_dir), split, cfg.data.loader, cfg.model.image_size,
        per_class_train=cfg.data.default_per_class)


def open_split(cfg: TrainConfig, split: str) -> TrainingSet:
    """The configured loader over one split (see data/sources.py for what it yields), or random images
    of its shape and ImageNet's length with data.synthetic."""
    if cfg.data.synthetic:
        return synthetic_images(cfg.model.image_size, IMAGENET_TRAIN if split == "train" else IMAGENET_VAL)
    return open_images(split_path(cfg, split), cfg.data.loader, cfg.model.image_size, cfg.data.ffcv_os_cache)
