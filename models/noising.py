"""Training-time randomness of RecTok: RAD token masking (docs/reference.md §1.6) and FSD latent noising (§1.4)."""
from __future__ import annotations

import math

import torch

T_SCHEDULES = ("shift", "uniform", "lognorm")


def dimension_shift(num_tokens: int, channels: int) -> float:
    """s = sqrt(N * C / 4096): 2.83 for 16x16x128."""
    return math.sqrt(num_tokens * channels / 4096)


def shift_time(u: torch.Tensor, s: float) -> torch.Tensor:
    """t = s*u / (1 + (s-1)*u); s > 1 biases t towards 1."""
    return s * u / (1 + (s - 1) * u)


def sample_fsd_t(batch: int, schedule: str, num_tokens: int, channels: int,
                 device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample FSD time, t = 1 is pure noise."""
    if schedule == "shift":
        u = torch.rand(batch, device=device, generator=generator)
        return shift_time(u, dimension_shift(num_tokens, channels))
    if schedule == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    if schedule == "lognorm":
        return torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    raise ValueError(f"unknown FSD t schedule {schedule!r}; choose one of {T_SCHEDULES}")


def fsd_noise(z: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """z_t = (1 - t) z + t * gamma * eps, t broadcast per sample."""
    t = t.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    return (1 - t) * z + t * gamma * torch.randn_like(z)


def sample_mask_ratio(low: float = -0.1, high: float = 0.4,
                      generator: torch.Generator | None = None) -> float:
    """One ratio per iteration, r = max(0, U(low, high)): P(r = 0) = 0.2 at the defaults."""
    u = torch.rand((), generator=generator).item()
    return max(0.0, low + (high - low) * u)


def expected_kept_fraction(low: float, high: float) -> float:
    """E[1 - r] for the RAD mask ratio r = max(0, U(low, high)) (docs/reference.md §1.6): 0.84 at (-0.1, 0.4)."""
    if low >= 0:
        return 1 - (low + high) / 2
    if high <= 0:
        return 1.0
    return 1 - high * high / (2 * (high - low))


def num_kept(num_tokens: int, ratio: float) -> int:
    return math.ceil(num_tokens * (1 - ratio))


def random_keep_ids(batch: int, num_tokens: int, keep: int, device=None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, keep] token indices from a per-sample random permutation, sorted to keep raster order."""
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values
