"""AdamW with the paper's weight-decay exclusions (docs/reference.md §1.10) and the per-iteration lr schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only >= 2-D weights; never biases, norms, embeddings, position embeddings, mask tokens.

    Modules may name more exclusions through `no_weight_decay()` (suffixes of parameter names).
    Frozen parameters (requires_grad False) are left out entirely.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = (p.ndim < 2 or name.endswith(".bias") or id(p) in embedding_params
                    or any(name == s or name.endswith("." + s) for s in skip))
        (no_decay if excluded else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


ADAMW_IMPLS = ("fused", "foreach", "for-loop")


def build_adamw(model: nn.Module, lr: float, betas, eps: float, weight_decay: float,
                impl: str = "foreach") -> torch.optim.Optimizer:
    """AdamW as `impl` (trainer/engine/kernels.choose_adamw): apex FusedAdam, torch fused, foreach, or the
    per-parameter for-loop (the benchmarks' baseline)."""
    groups = param_groups(model, weight_decay)
    if impl == "apex":
        from apex.optimizers import FusedAdam  # apex: optional, a CUDA source build; imported where used
        return FusedAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adam_w_mode=True)
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"unknown AdamW implementation {impl!r}")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps,
                             fused=True if impl == "fused" else None, foreach=impl == "foreach")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to peak over warmup_steps, then cosine to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def constant_linear(step: int, warmup_steps: int, decay_start: int, decay_end: int, peak_lr: float,
                    min_lr: float) -> float:
    """The DiT recipe: (optional warm-up), peak until decay_start, linear to min_lr at decay_end, then min_lr."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if step <= decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start) / max(1, decay_end - decay_start))
    return peak_lr + (min_lr - peak_lr) * progress


def lr_schedule(kind: str, steps_per_epoch: int, total_steps: int, warmup_epochs: float, peak_lr: float,
                min_lr: float, decay_start_epoch: float = 0.0, decay_end_epoch: float = 0.0):
    """step -> lr for the configured schedule kind (epochs converted to optimizer steps here, once)."""
    warmup = round(warmup_epochs * steps_per_epoch)
    if kind == "cosine":
        return lambda step: warmup_cosine(step, total_steps, warmup, peak_lr, min_lr)
    if kind == "constant_linear":
        start, end = round(decay_start_epoch * steps_per_epoch), round(decay_end_epoch * steps_per_epoch)
        return lambda step: constant_linear(step, warmup, start, end, peak_lr, min_lr)
    raise ValueError(f"unknown schedule kind {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
