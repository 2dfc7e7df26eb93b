"""The bundled default dataset: ten classes of procedurally drawn shapes, generated once to PNG files.

Each class is a distinct geometric pattern in its own band of hues (jittered, overlapping its
neighbours) on a random greyish background, with random size and position. Like real classes, they
differ in colour statistics as well as in shape: a linear probe separates them from tokenizer
latents (the paper's probing protocol has something to find), class-conditional samples are
recognisable at a glance, and reconstructions of edges and colours visibly sharpen with training.
Written in the ImageNet folder layout (`train/<class>/*.png`, `val/<class>/*.png`) and, for the FFCV
loader, into `train.beton` / `val.beton` beside it by the same writer users run on ImageNet (raw
pixels: the PNGs are lossless), so the demo and the tests go through the loader users train with.
"""
from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from .ffcv_writer import write_ffcv

CLASSES = ("circle", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "checker",
           "diagonal", "dots")
VERSION = 2  # 2: class hue bands (1: random colours, not linearly separable)
HUE_JITTER = 0.3  # in units of one class's hue band: neighbouring classes overlap a little


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def draw_shape(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    s = 4  # supersampling for smooth edges
    big = size * s
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}")
    k = CLASSES.index(cls)
    bg = _hsv(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.1, 0.9))
    fg = _hsv((k + rng.uniform(-HUE_JITTER, HUE_JITTER)) / len(CLASSES), rng.uniform(0.6, 1), rng.uniform(0.6, 1))
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    r = big * rng.uniform(0.22, 0.38)
    cx, cy = big * rng.uniform(0.35, 0.65), big * rng.uniform(0.35, 0.65)
    box = (cx - r, cy - r, cx + r, cy + r)
    period = int(big * rng.uniform(0.12, 0.22))
    if cls == "circle":
        d.ellipse(box, fill=fg)
    elif cls == "square":
        d.rectangle(box, fill=fg)
    elif cls == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif cls == "cross":
        w = r * 0.35
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
    elif cls == "ring":
        d.ellipse(box, outline=fg, width=max(1, int(r * 0.3)))
    elif cls == "hstripes":
        for y in range(0, big, period):
            d.rectangle((0, y, big, y + period // 2), fill=fg)
    elif cls == "vstripes":
        for x in range(0, big, period):
            d.rectangle((x, 0, x + period // 2, big), fill=fg)
    elif cls == "checker":
        for y in range(0, big, period):
            for x in range(0, big, period):
                if (x // period + y // period) % 2 == 0:
                    d.rectangle((x, y, x + period - 1, y + period - 1), fill=fg)
    elif cls == "diagonal":
        d.line((0, 0, big, big) if rng.random() < 0.5 else (0, big, big, 0), fill=fg, width=int(r * 0.5))
    elif cls == "dots":
        for _ in range(5):
            x, y, q = rng.uniform(0, big), rng.uniform(0, big), big * 0.07
            d.ellipse((x - q, y - q, x + q, y + q), fill=fg)
    return img.resize((size, size), Image.LANCZOS)


def generate(root: str, image_size: int = 32, per_class_train: int = 256, per_class_val: int = 32,
             seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for cls in CLASSES:
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(count):
                draw_shape(cls, image_size, rng).save(os.path.join(root, split, cls, f"{cls}_{i:05d}.png"))


def ensure_default_dataset(base_dir: str, image_size: int = 32, per_class_train: int = 256,
                           per_class_val: int = 32, seed: int = 0) -> str:
    """Generate the dataset under base_dir once (atomically) and return its root."""
    params = dict(version=VERSION, image_size=image_size, train=per_class_train, val=per_class_val, seed=seed)
    root = os.path.join(base_dir, f"shapes{len(CLASSES)}-v{VERSION}-{image_size}px-s{seed}-n{per_class_train}")
    marker = os.path.join(root, "dataset.json")
    if os.path.isfile(marker):
        return root
    os.makedirs(base_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=base_dir)
    try:
        generate(tmp, image_size, per_class_train, per_class_val, seed)
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(dict(params, classes=list(CLASSES)), f)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first; its copy is identical
            if not os.path.isfile(marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_split(base_dir: str, split: str, loader: str, image_size: int = 32, per_class_train: int = 256) -> str:
    """The default dataset's `split` for `loader`: its class folder (pil) or its .beton (ffcv), made once."""
    root = ensure_default_dataset(base_dir, image_size, per_class_train)
    folder = os.path.join(root, split)
    if loader != "ffcv":
        return folder
    beton = os.path.join(root, f"{split}.beton")
    if not os.path.isfile(beton):
        write_ffcv(folder, beton, image_size, storage="raw", workers=min(2, os.cpu_count() or 1), progress=False)
    return beton
