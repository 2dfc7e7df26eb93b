"""Images as the evaluation sees them: PSNR, the protocol's uint8 quantisation, and picture grids."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import save_image


def psnr(a01: torch.Tensor, b01: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = (a01 - b01).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 [B, 3, H, W], quantised by truncation as the evaluation protocol does
    (docs/reference.md §4): what Inception sees for FID, IS and precision/recall."""
    x01 = (images.float() * 0.5 + 0.5).clamp(0, 1)
    return (x01 * 255).to(torch.uint8)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> uint8 HWC arrays (PNG and .npz layout), quantised as `to_uint8_images`."""
    return to_uint8_images(images).permute(0, 2, 3, 1).cpu().numpy()


def enlarged(images: torch.Tensor, min_side: int) -> torch.Tensor:
    """[N, C, H, W] as float, enlarged by an integer factor (nearest) to about min_side pixels, so tiny
    images can be looked at."""
    x = images.float()
    if x.shape[-1] < min_side:
        x = F.interpolate(x, scale_factor=min_side // x.shape[-1], mode="nearest")
    return x


def save_grid(path: str, images: torch.Tensor, nrow: int = 8) -> str:
    """Images in [-1, 1] as one PNG, enlarged to 128 px."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image((enlarged(images, 128) * 0.5 + 0.5).clamp(0, 1), path, nrow=nrow, padding=2)
    return path
