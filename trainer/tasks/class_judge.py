"""The class judge of a run's dataset (trainer/evaluation/classifier.py): where it is kept, trained once
on the training split when missing, loaded for DiT evaluation, `rectok eval generator` and the demo.

eval.classifier = auto keeps it beside the training split (`train.beton` -> `train.class_judge_32px
.safetensors`), so every tokenizer and DiT trained on one dataset is judged by the same classifier;
a path keeps it there; none turns class accuracy off.
"""
from __future__ import annotations

import logging
import os

import torch

from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError
from trainer.engine.distributed import barrier, broadcast_str, rank_and_world
from trainer.evaluation.classifier import ClassJudge, load_judge, save_judge, train_judge

from .splits import open_split, split_path

log = logging.getLogger(__name__)


def judge_path(cfg: TrainConfig) -> str | None:
    """Where the class judge of `cfg`'s dataset is kept; None when class accuracy is off."""
    where = cfg.eval.classifier
    if where == "none" or cfg.data.synthetic or cfg.task != "dit":
        return None
    if where != "auto":
        return os.path.expanduser(where)
    train = split_path(cfg, "train").rstrip("/")
    return f"{train}.class_judge_{cfg.model.image_size}px.safetensors"


def prepare_class_judge(cfg: TrainConfig, device: torch.device) -> None:
    """Every rank together: the judge file, trained by rank 0 when missing while the others wait (the
    default dataset is generated first, by rank 0, if needed). A no-op when class accuracy is off."""
    path = judge_path(cfg)
    if path is None:
        return
    rank, world = rank_and_world()
    missing = not os.path.isfile(path)
    if world > 1:
        missing = bool(broadcast_str("missing" if missing else ""))
    if not missing:
        return
    if rank == 0:
        folder = os.path.dirname(path) or "."
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"eval.classifier=auto keeps the class judge beside the training split, but {folder} "
                              f"is not writable: set eval.classifier to a writable path (or none)")
        train, val = open_split(cfg, "train"), open_split(cfg, "val")
        log.info("training the class judge of %s (held-out: %s) -> %s", train.path, val.path, path)
        model, info = train_judge(train, val, cfg.dit.num_classes, device, num_workers=cfg.data.num_workers)
        save_judge(path, model, info)
    if world > 1:
        barrier()


def load_class_judge(cfg: TrainConfig, device: torch.device) -> tuple[ClassJudge, dict] | tuple[None, None]:
    """The judge of `cfg`'s dataset, checked against the run's classes; (None, None) when class accuracy
    is off. prepare_class_judge (on every rank together) makes the file first."""
    path = judge_path(cfg)
    if path is None:
        return None, None
    model, info = load_judge(path, device)
    if info["num_classes"] != cfg.dit.num_classes:
        raise ConfigError(f"class judge {path} tells {info['num_classes']} classes, the run has "
                          f"{cfg.dit.num_classes}: delete it or set eval.classifier to another path")
    info = dict(info, path=path)
    return model, info
