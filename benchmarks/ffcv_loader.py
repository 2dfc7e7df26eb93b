"""Image loading throughput at 256 px: our FFCV loader against the research code's PIL pipeline.

Both read the same images in the same run on the same cores:
  reference  original JPEGs, PIL decode + ADM centre crop + flip + ToTensor/Normalize in a torch
             DataLoader with W worker processes (what the authors' code does every epoch)
  ffcv       the .beton written once by `rectok data write-ffcv` (ADM crop done at write time,
             JPEG quality 95), decoded by FFCV's compiled pipeline on W threads; uint8 batches, the
             [-1, 1] conversion is done on the GPU in training. `ffcv+norm` also does it here on the
             CPU, as a conservative bound for a machine without a GPU.
The sources are synthetic photographs with ImageNet's size mix (mostly 500x375-ish, some larger)
and about ImageNet's JPEG sizes; they are generated once into --work.

    python benchmarks/ffcv_loader.py [--images 2000] [--workers W] [--batch 64] [--epochs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import adm_center_crop, open_images, rank_batches, to_model_range  # noqa: E402
from data.ffcv_writer import write_ffcv  # noqa: E402

# (width, height, weight): roughly ImageNet-1K train's mix (median 500x375; 1.28M images, ~110 KB each).
SIZES = [(500, 375, 40), (500, 333, 20), (375, 500, 12), (500, 400, 8), (333, 500, 5), (640, 480, 5),
         (800, 600, 4), (1024, 768, 3), (300, 225, 3)]


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour fields, a few objects and sensor-like noise: JPEG sizes like real photographs."""
    base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(base).astype(np.int16)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - w // 4), rng.integers(0, h - h // 4)
        arr[y0:y0 + rng.integers(h // 8, h // 3), x0:x0 + rng.integers(w // 8, w // 3)] += rng.integers(-80, 80, 3)
    arr += rng.normal(0, 10, arr.shape).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_sources(root: str, count: int, classes: int = 10) -> str:
    folder = os.path.join(root, f"jpeg-v2-{count}")
    if os.path.isfile(os.path.join(folder, "done")):
        return folder
    rng = np.random.default_rng(0)
    weights = np.array([s[2] for s in SIZES], dtype=np.float64)
    for i in range(count):
        w, h, _ = SIZES[rng.choice(len(SIZES), p=weights / weights.sum())]
        d = os.path.join(folder, f"n{i % classes:08d}")
        os.makedirs(d, exist_ok=True)
        photo(rng, w, h).save(os.path.join(d, f"{i:06d}.JPEG"), quality=95)
    open(os.path.join(folder, "done"), "w").close()
    return folder


class ResearchPipeline(torch.utils.data.Dataset):
    """The authors' loading: ImageFolder-style PIL decode, ADM crop, random flip, ToTensor, Normalize."""

    def __init__(self, folder: str, size: int):
        from torchvision import transforms
        self.files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(".JPEG"))
        self.size = size
        self.transform = transforms.Compose([
            transforms.Lambda(lambda img: adm_center_crop(img, size)), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], inplace=True)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with open(self.files[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img), 0


def timed(batches, epochs: int) -> float:
    """img/s over `epochs` passes after one warm-up pass (page cache filled, FFCV pipeline compiled)."""
    for _ in batches():
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x in batches():
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader processes / threads (cores)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rectok-bench-ffcv"))
    args = p.parse_args()
    torch.set_num_threads(1)
    w = args.workers
    t0 = time.perf_counter()
    folder = make_sources(args.work, args.images)
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(".JPEG")]
    mean_kb = np.mean([os.path.getsize(f) for f in files]) / 1024
    print(f"sources: {len(files)} JPEGs, mean {mean_kb:.0f} KB ({time.perf_counter() - t0:.0f} s to make)")
    beton = os.path.join(args.work, f"train-{args.images}-{args.size}.beton")
    t0 = time.perf_counter()
    write_ffcv(folder, beton, args.size, "jpeg", 95, workers=w, progress=False)
    write_rate = len(files) / (time.perf_counter() - t0)

    research = ResearchPipeline(folder, args.size)
    ref_loader = torch.utils.data.DataLoader(research, batch_size=args.batch, shuffle=True, num_workers=w,
                                             drop_last=True, persistent_workers=True)
    ffcv = open_images(beton, "ffcv", args.size)
    epoch = [0]

    def ffcv_batches(normalise: bool):
        def run():
            epoch[0] += 1
            for x, _, _ in ffcv.batches(rank_batches(len(ffcv), args.batch, 0, epoch[0], 0, 1), w):
                yield to_model_range(x, torch.device("cpu")) if normalise else x
        return run

    rates = {"reference (PIL + ADM crop, DataLoader)": timed(lambda: (x for x, _ in ref_loader), args.epochs),
             "ffcv (uint8 batches)": timed(ffcv_batches(False), args.epochs),
             "ffcv+norm (and [-1, 1] on the CPU)": timed(ffcv_batches(True), args.epochs)}
    ref = next(iter(rates.values()))
    print(f"\n{args.size} px, batch {args.batch}, {w} workers on {os.cpu_count()} cores, {args.epochs} epochs "
          f"of {len(files)} images after a warm-up epoch")
    print(f"{'pipeline':40s} {'img/s':>9s} {'img/s/core':>11s} {'vs reference':>13s}")
    for name, r in rates.items():
        print(f"{name:40s} {r:9.0f} {r / w:11.0f} {r / ref:12.2f}x")
    print(f"write-ffcv: {write_rate:.0f} img/s with {w} processes (both passes)")
    print(json.dumps({"images": len(files), "mean_kb": round(mean_kb), "size": args.size, "workers": w,
                      "img_per_s": {k: round(v) for k, v in rates.items()}, "write_img_per_s": round(write_rate)}))


if __name__ == "__main__":
    main()
