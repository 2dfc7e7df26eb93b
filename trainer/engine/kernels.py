"""Kernels chosen at run time, once, and logged: attention (flash-attn or SDPA) and the AdamW implementation.

The choice depends on what is installed and on the device, never on the model code.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from models.blocks import Attention, set_attention_backend
from trainer.config.tree import ConfigError

log = logging.getLogger(__name__)

FLASH_MAX_HEAD_DIM = 256


def flash_attn_usable() -> tuple[bool, str]:
    """flash-attn with its compiled CUDA kernels, and a CUDA device to run them."""
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash-attn is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        from flash_attn import flash_attn_func  # noqa: F401  (optional GPU extra; imports the CUDA extension)
    except ImportError as e:
        return False, f"flash-attn's CUDA kernels do not load ({e})"
    return True, "flash-attn with CUDA kernels"


def attention_head_dims(modules: list[nn.Module]) -> set[int]:
    return {m.qkv.in_features // m.heads for mod in modules for m in mod.modules() if isinstance(m, Attention)}


def choose_attention(requested: str, device: torch.device, head_dims: set[int]) -> tuple[str, str]:
    """('flash' | 'sdpa' | 'math', why). `requested` is parallel.attention: auto, flash, sdpa or math."""
    if requested in ("sdpa", "math"):
        return requested, "asked for"
    ok, why = flash_attn_usable() if device.type == "cuda" else (False, f"device is {device.type}")
    bad = sorted(d for d in head_dims if d > FLASH_MAX_HEAD_DIM or d % 8)
    if ok and bad:
        ok, why = False, f"head dims {bad} are not supported by flash-attn"
    if requested == "flash" and not ok:
        raise ConfigError(f"parallel.attention: flash was asked for but cannot run: {why}")
    return ("flash", why) if ok else ("sdpa", f"PyTorch SDPA ({why})")


def choose_adamw(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """('apex' | 'fused' | 'foreach' | 'for-loop', why). `requested` is parallel.adamw; auto = torch's fused
    AdamW on CUDA, else foreach. apex is used only when asked for: torch's fused kernel takes `found_inf`,
    which lets the loop skip a NaN step on the device instead of reading the loss every step."""
    if requested == "apex" and importlib.util.find_spec("apex") is None:
        raise ConfigError("parallel.adamw: apex was asked for but is not installed (use fused or auto)")
    if requested != "auto":
        return requested, "asked for"
    if device.type != "cuda":
        return "foreach", f"device is {device.type}"
    return "fused", "torch fused AdamW"


def select_kernels(requested_attention: str, device: torch.device, modules: list[nn.Module],
                   requested_adamw: str = "auto") -> dict[str, str]:
    """Choose, apply and log the kernels of a run; returns {'attention': ..., 'adamw': ...}."""
    attn, attn_why = choose_attention(requested_attention, device, attention_head_dims(modules))
    set_attention_backend(attn)
    adamw, adamw_why = choose_adamw(device, requested_adamw)
    if device.type == "cuda":  # the fp32 matmuls left outside autocast (losses, norms) on tensor cores
        torch.set_float32_matmul_precision("high")
    log.info("kernels: attention %s (%s); AdamW %s (%s)", attn, attn_why, adamw, adamw_why)
    return {"attention": attn, "adamw": adamw}
