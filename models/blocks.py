"""Transformer pieces shared by the RecTok encoder, pixel decoder and semantic decoder (docs/reference.md §1.1-1.2)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RMS_EPS = 1e-6


@dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


# docs/reference.md §1.1 sizes (width, depth, heads).
VIT_SIZES = {
    "tiny": ViTSize(192, 3, 4),
    "small": ViTSize(512, 8, 8),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
}


def swiglu_hidden(width: int) -> int:
    return int(2 / 3 * 4 * width)


def tokenizer_rope_table(head_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The released tokenizer's 2-D RoPE table, [H*W, 2*head_dim] = concat(cos, sin) (docs/reference.md §1.2).

    Frequencies are block-repeated (concat(f, f)) while rotate_half pairs adjacent channels, so this
    is not an exact rotation; the released weights were trained with it, so it is kept bit-for-bit.
    """
    if head_dim % 4:
        raise ValueError(f"tokenizer RoPE needs a head dim divisible by 4, got {head_dim}")
    f = 7.0 * (7.0 / 7e-4) ** torch.linspace(0, -1, head_dim // 4, dtype=torch.float64)
    f2 = torch.cat([f, f])  # [D/2]
    rows = torch.linspace(0, 1, grid_h, dtype=torch.float64)
    cols = torch.linspace(0, 1, grid_w, dtype=torch.float64)
    r, c = torch.meshgrid(rows, cols, indexing="ij")  # row-major token order
    row_angle = 2 * math.pi * r.reshape(-1, 1) * f2
    col_angle = 2 * math.pi * c.reshape(-1, 1) * f2
    angle = torch.cat([row_angle, col_angle], dim=-1)  # [N, D]
    return torch.cat([angle.cos(), angle.sin()], dim=-1).float()


def rotate_half_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack([-x[..., 1], x[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; table: [T, 2D] or [B, T, 2D] (per-sample rows after token dropping)."""
    cos, sin = table.to(x.dtype).chunk(2, dim=-1)
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half_pairs(x) * sin


# Which attention kernel `attention` runs: chosen once per run by the trainer (trainer/engine/kernels.py),
# so model code stays the same whatever is installed.
_ATTENTION_BACKEND = {"name": "sdpa"}
ATTENTION_BACKENDS = ("sdpa", "flash", "math")


def set_attention_backend(name: str) -> None:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {ATTENTION_BACKENDS}")
    _ATTENTION_BACKEND["name"] = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention, default scale; q, k, v: [B, heads, T, D].

    flash-attn takes only half-precision CUDA tensors; anything else (fp32 evaluation, CPU) runs SDPA.
    `math` writes the scores out, softmax in fp32: the research code's way, kept as the benchmarks' baseline.
    """
    if _ATTENTION_BACKEND["name"] == "math":
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return scores.float().softmax(-1).to(v.dtype) @ v
    if _ATTENTION_BACKEND["name"] == "flash" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from flash_attn import flash_attn_func
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width, bias=True)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        # Released layout: (qkv, head, head_dim).
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden, bias=True)  # rows = [gate | value]
        self.w3 = nn.Linear(hidden, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm block: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

    # True where the token count changes from call to call (the tokenizer encoder's blocks: RAD masking keeps
    # a different K every step); compiled blocks then treat it as symbolic (trainer/parallel/block_wrapping.py).
    varying_tokens = False

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=RMS_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.RMSNorm(width, eps=RMS_EPS)
        self.mlp = SwiGLU(width, swiglu_hidden(width))

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


def block_flops(width: int, tokens: int) -> int:
    """Forward FLOPs (2 per multiply-add) of one Block on `tokens` tokens, attention included."""
    h = swiglu_hidden(width)
    linear_macs = tokens * (width * 3 * width + width * width + width * 2 * h + h * width)
    attn_macs = 2 * tokens * tokens * width  # QK^T and AV
    return 2 * (linear_macs + attn_macs)


def init_trunc_normal(module: nn.Module) -> None:
    """Trunc-normal(0.02) Linear/Conv weights with zero bias, as the released encoder/decoder."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: [B, N, ...] or [N, ...] (shared); ids: [B, K] -> [B, K, ...]."""
    if x.dim() == ids.dim():  # shared table [N, D]
        return x[ids]
    idx = ids.reshape(*ids.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def scatter_tokens(kept: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor, n: int) -> torch.Tensor:
    """Place kept tokens [B, K, D] at their grid positions, `fill` [D] everywhere else -> [B, N, D]."""
    b, _, d = kept.shape
    out = fill.to(kept.dtype).expand(b, n, d).clone()
    return out.scatter(1, ids.unsqueeze(-1).expand(-1, -1, d), kept)
