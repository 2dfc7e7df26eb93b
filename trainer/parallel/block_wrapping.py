"""Per-block activation checkpointing and torch.compile, applied to a trained module in place before its
data-parallel wrapping (parameter names unchanged, so checkpoints do not depend on these options)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.blocks import Block

BLOCK_RECOMPILE_LIMIT = 32


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, Block)]


def _varying_tokens(compiled: Callable) -> Callable:
    """`compiled` called with the token dimension of x [B, T, W] and of the RoPE table ([T, 2D] or
    [B, T, 2D]) marked dynamic: one graph with a symbolic T for every kept count K.

    Marked here, at the compiled frame's entry and after the module's forward pre-hooks: FSDP2's hooks
    hand forward new tensors (its post-backward hook wraps every input that requires grad), so a mark set
    by the caller would be lost. Marking sets an attribute on the tensors: no host sync, no numerics.
    """
    def forward(x: torch.Tensor, rope: torch.Tensor | None, *args, **kwargs):
        torch._dynamo.maybe_mark_dynamic(x, 1)
        if rope is not None:
            torch._dynamo.maybe_mark_dynamic(rope, rope.dim() - 2)
        return compiled(x, rope, *args, **kwargs)
    return forward


def apply_block_options(module: nn.Module, checkpointing: bool, compile_blocks: bool) -> None:
    """Per-block activation checkpointing and torch.compile, in place (parameter names unchanged)."""
    if not (checkpointing or compile_blocks):
        return
    if compile_blocks:
        # All blocks share one code object, so one cache and one recompile limit (8 by default): training
        # needs a graph per (width, dtype, RoPE layout) - 2 to 3 - and evaluation under no_grad adds one
        # per batch size it meets. Past the limit dynamo runs new shapes eager, with one warning.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    for block in transformer_blocks(module):
        forward = block.forward
        if checkpointing:
            forward = lambda *a, _f=forward, **k: torch.utils.checkpoint.checkpoint(  # noqa: E731
                _f, *a, use_reentrant=False, **k)
        if compile_blocks:
            # forward, not the module's __call__: per-block hooks (FSDP2's gathers) stay eager, outside
            # the graph, as dynamo would run them anyway. dynamic=False turns dynamo's automatic dynamic
            # shapes off: every Block shares one code object, hence one cache and one recompile limit, and
            # the second width it met (DiT^DH's trunk and head, the semantic decoder) would turn the width
            # symbolic, and the first K would compile static, then again symbolic. Static graphs per
            # (width, dtype, RoPE layout, grad mode), one with a symbolic K where the model says so.
            forward = torch.compile(forward, dynamic=False)
            if block.varying_tokens:
                forward = _varying_tokens(forward)
        block.forward = forward
