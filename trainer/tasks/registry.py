"""`task` in the config -> the Task (trainer/engine/protocols.py) that trains it."""
from __future__ import annotations

import torch

from trainer.config.schema import TrainConfig
from trainer.engine.protocols import Task

from .dit import DiTTask
from .tokenizer import TokenizerTask

TASKS = {"tokenizer": TokenizerTask, "dit": DiTTask}


def build_task(cfg: TrainConfig, device: torch.device, main: bool = True) -> Task:
    """`main`: this process writes the shared files (pictures); every rank computes."""
    return TASKS[cfg.task](cfg, device, main)
