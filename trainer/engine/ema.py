"""Exponential moving average of a model's parameters, updated every optimizer step from initialisation."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor: its local shard for an FSDP2 DTensor, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, finite: torch.Tensor | None = None) -> None:
        """ema = decay*ema + (1-decay)*param; no change where `finite` (a device bool) is false, the step
        the optimizer skipped (decided on the device: no host sync)."""
        # Sharded (FSDP2) copies are sharded alike: each rank averages its own pieces. The sources are the
        # fp32 master weights (DDP's parameters, FSDP2's shards; DeepSpeed's bf16 modules have their own
        # EMA, deepspeed_strategy.PartitionedEMA): a lower-precision source would be a bug, and lerp refuses it.
        ema = [local_shard(p) for p in self.model.parameters()]
        src = [local_shard(p.detach()) for p in model.parameters()]
        if finite is None:
            torch._foreach_lerp_(ema, src, 1.0 - self.decay)
        else:
            # A weight on the device: lerp's foreach kernels take it only as a Python number (a list of
            # 0-dim tensors falls back to one launch per parameter), multiplication takes one tensor.
            delta = torch._foreach_sub(src, ema)
            torch._foreach_mul_(delta, (1.0 - self.decay) * finite.float())
            torch._foreach_add_(ema, delta)
        for be, b in zip(self.model.buffers(), model.buffers()):
            if be.dtype == b.dtype:  # a buffer a strategy cast to bf16 would only round the EMA's own copy
                be.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd)
