"""The one way to run a training: the task and the strategy the config names, driven by the engine's loop.

`rectok train` (alone or under torchrun), the Slurm job of `rectok submit` and `rectok sweep`, the demo
and `rectok profile` all build their trainer here.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.config.schema import TrainConfig
from trainer.engine.distributed import DistEnv
from trainer.engine.loop import Trainer
from trainer.engine.preemption import StopRequest
from trainer.parallel.strategy import build_strategy

from .class_judge import prepare_class_judge
from .latents import prepare_latent_stats
from .registry import build_task


def prepare_files(cfg: TrainConfig, device: torch.device) -> None:
    """What every rank makes together before the task is built: latent statistics, the class judge."""
    prepare_latent_stats(cfg, device)
    prepare_class_judge(cfg, device)


def build_trainer(cfg: TrainConfig, env: DistEnv | None = None, stop: StopRequest | None = None) -> Trainer:
    """A trainer for `cfg`, set up and resumed (env: this process's rank, by default the launcher's)."""
    return Trainer(cfg, build_task, build_strategy, env, stop, prepare_task=prepare_files)


def train(cfg: TrainConfig) -> dict:
    """Train `cfg` in this process to its end (the demo, tests); returns the final result."""
    return build_trainer(cfg).fit()


def run_training(cfg: TrainConfig, env: DistEnv, stop: StopRequest | None = None) -> tuple[dict, StopRequest]:
    """Train `cfg` as this rank of a launched job, to its end or its stop: USR2 or TERM (sbatch --signal,
    scancel, a preemption, torchrun passing TERM on) checkpoints every rank at one step boundary and stops
    (the result then says `preempted`; the StopRequest says which signal). The process group is left when
    it returns. `stop`: handlers the caller installed and keeps (the Slurm job, until it exits); by
    default they are installed for the run and the previous ones restored after it."""
    own = stop is None
    stop = StopRequest().install() if own else stop
    try:
        result = build_trainer(cfg, env, stop).fit()  # files checked first
    finally:
        if own:
            stop.uninstall()
        if dist.is_initialized():
            dist.destroy_process_group()
    return result, stop
