"""Image files: where they are (a class folder or a list file), the ADM centre crop, the model's range.

Every loader and the .beton writer read images through `list_images` and `load_crop`, so the FFCV
path and the PIL fallback see the same files, the same labels and the same pixels.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# What a damaged image file raises from PIL (truncated data, bad headers, decompression bombs).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(ValueError):
    """A dataset that cannot be read as configured: the message says what to change."""


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """docs/reference.md §3: halve with BOX while the short side >= 2*size, BICUBIC short side to size, centre crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def load_crop(path: str, size: int) -> np.ndarray:
    """One image file -> its ADM centre crop, uint8 [size, size, 3] RGB (grayscale, CMYK, palette converted)."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(adm_center_crop(img.convert("RGB"), size))


def decode_check(path: str) -> str | None:
    """None when the whole file decodes to RGB, else why not (what the .beton writer skips)."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
            if min(rgb.size) < 1:
                return f"empty image {rgb.size}"
    except UNREADABLE as e:
        return f"{type(e).__name__}: {e}"
    return None


def list_images(src: str, root: str | None = None) -> tuple[list[tuple[str, int]], list[str] | None]:
    """(path, label) pairs and class names of a split.

    `src` is a folder of class folders (`<synset>/<image>`: labels follow the sorted folder names, the
    standard ImageNet order) or a list file of `<relative path> <label>` lines, paths relative to
    `root` (default: the list file's folder); a list file has no class names.
    """
    if os.path.isdir(src):
        classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
        samples = [(os.path.join(src, c, f), i) for i, c in enumerate(classes)
                   for f in sorted(os.listdir(os.path.join(src, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not samples:
            raise DataError(f"no images under {src} (expected {src}/<class>/<image> with one of {IMAGE_EXTENSIONS})")
        return samples, classes
    if not os.path.isfile(src):
        raise FileNotFoundError(f"image source not found: {src} (a folder of class folders or a list file)")
    base = root if root is not None else os.path.dirname(os.path.abspath(src))
    samples = []
    with open(src) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rstrip("\n").rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise DataError(f"{src}:{number}: expected '<relative path> <label>' with a label >= 0, got {line!r}")
            samples.append((os.path.join(base, parts[0]), int(parts[1])))
    if not samples:
        raise DataError(f"{src} lists no images")
    return samples, None


def to_model_range(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Loader images (uint8 [B, 3, H, W]) -> float in [-1, 1] on `device`: the copy is 4x smaller than
    a float one and the arithmetic runs there."""
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
