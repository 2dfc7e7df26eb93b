"""The autocast dtype of a run (parallel.precision), one rule for training, evaluation and sampling."""
from __future__ import annotations

import torch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or by default on CUDA; None (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
