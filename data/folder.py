"""Image-folder datasets (ImageNet layout) with the ADM centre crop, and deterministic per-rank batching."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """SPEC 3: halve with BOX while the short side >= 2*size, BICUBIC short side to size, centre crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float CHW in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(Dataset):
    """`root/<split>/<synset>/<image>`; labels follow the sorted class folders (ImageNet order)."""

    def __init__(self, root: str, split: str, image_size: int):
        self.dir, self.image_size = os.path.join(root, split), image_size
        if not os.path.isdir(self.dir):
            raise FileNotFoundError(f"dataset split not found: {self.dir} (expected <root>/{split}/<class>/<image>)")
        self.classes = sorted(e.name for e in os.scandir(self.dir) if e.is_dir())
        self.samples = [(os.path.join(self.dir, c, f), i) for i, c in enumerate(self.classes)
                        for f in sorted(os.listdir(os.path.join(self.dir, c)))
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise FileNotFoundError(f"no images under {self.dir}")
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        with Image.open(self.samples[index][0]) as img:
            return to_tensor(adm_center_crop(img.convert("RGB"), self.image_size))

    def __getitem__(self, index: int):
        # An unreadable image is skipped (the next readable one stands in) and counted, never fatal.
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                return self.load(i), self.samples[i][1], i
            except (OSError, ValueError, SyntaxError) as e:
                self.num_skipped += 1
                log.warning("skipping unreadable image %s (%s); %d skipped in this process",
                            self.samples[i][0], e, self.num_skipped)
        raise RuntimeError(f"no readable image under {self.dir}")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every rank, reproducible from (seed, epoch), new each epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def rank_batches(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's per-step index lists; the last partial global batch is dropped (training)."""
    order = epoch_order(n, seed, epoch)
    steps = n // (batch * world)
    mine = order[: steps * batch * world].view(steps, world, batch)[:, rank]
    return mine.tolist()


def sequential_batches(ids, size: int) -> list[list[int]]:
    """`ids` in order, in batches of `size` (the last may be short): evaluation and one-pass encoding."""
    ids = list(ids)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def steps_per_epoch(n: int, batch: int, world: int) -> int:
    return n // (batch * world)


def make_loader(dataset: Dataset, batches: list[list[int]], num_workers: int) -> DataLoader:
    # Its own generator: creating a loader iterator otherwise draws from the global RNG, which would
    # make a resumed run's noise differ from an uninterrupted one.
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
