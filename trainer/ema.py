"""Exponential moving average of a model's parameters, updated every optimizer step from initialisation."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [p for p in self.model.parameters()]
        src = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, src, 1.0 - self.decay)  # ema = decay*ema + (1-decay)*param
        for be, b in zip(self.model.buffers(), model.buffers()):
            be.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd)
