"""parallel.strategy -> the strategy object the loop drives (trainer/engine/protocols.py: Strategy)."""
from __future__ import annotations

import torch

from trainer.config.schema import TrainConfig
from trainer.engine.distributed import DistEnv
from trainer.engine.protocols import Strategy

from .deepspeed_strategy import DeepSpeedStrategy
from .torch_strategy import TorchStrategy


def build_strategy(cfg: TrainConfig, env: DistEnv, device: torch.device, adamw_impl: str) -> Strategy:
    if cfg.parallel.strategy == "deepspeed":
        return DeepSpeedStrategy(cfg, env, device, adamw_impl)
    return TorchStrategy(cfg, env, device, adamw_impl)
