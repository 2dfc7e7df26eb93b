"""Per-block activation checkpointing and torch.compile, applied to a trained module in place before its
data-parallel wrapping (parameter names unchanged, so checkpoints do not depend on these options)."""
from __future__ import annotations

import torch
from torch import nn

from models.blocks import Block


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, Block)]


def apply_block_options(module: nn.Module, checkpointing: bool, compile_blocks: bool) -> None:
    """Per-block activation checkpointing and torch.compile, in place (parameter names unchanged)."""
    for block in transformer_blocks(module):
        if checkpointing:
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: torch.utils.checkpoint.checkpoint(
                _f, *a, use_reentrant=False, **k)
        if compile_blocks:
            block.compile()
