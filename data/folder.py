"""The fallback loader: image files decoded by PIL with the ADM crop in a torch DataLoader.

For machines without FFCV (`data.loader=pil`); it reads the same folders and list files the .beton
writer reads and yields what the FFCV loader yields.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .images import UNREADABLE, list_images, load_crop

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (inputs, int64 labels, int64 sample ids)


class TorchBatches:
    """For map-style datasets: the loader interface every training set has (see FFCVImages.batches)."""

    def batches(self, index_batches: list[list[int]], num_workers: int | str) -> Iterator[Batch]:
        return iter(make_loader(self, index_batches, num_workers))


def workers_per_rank(num_workers: int | str) -> int:
    """data.num_workers; auto = the cores this process may use divided by the ranks on its node
    (LOCAL_WORLD_SIZE, set by torchrun), at least 1: 8 ranks of a 16-core node get 2 decoders each, not
    the 64 threads a fixed 8 per rank made."""
    if num_workers != "auto":
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def make_loader(dataset: Dataset, batches: list[list[int]], num_workers: int | str) -> DataLoader:
    # Its own generator: creating a loader iterator otherwise draws from the global RNG, which would
    # make a resumed run's noise differ from an uninterrupted one.
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers_per_rank(num_workers),
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0))


class ImageFolderDataset(TorchBatches, Dataset):
    """A split as a class folder (`<synset>/<image>`, labels in sorted-synset order) or a list file;
    item i -> (uint8 [3, size, size] ADM crop, label, i)."""

    def __init__(self, path: str, image_size: int):
        self.path, self.image_size = path, image_size
        self.samples, self.classes = list_images(path)
        self.labels = np.asarray([label for _, label in self.samples], dtype=np.int64)
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        return torch.from_numpy(load_crop(self.samples[index][0], self.image_size).copy()).permute(2, 0, 1)

    def __getitem__(self, index: int):
        # An unreadable image is skipped (the next readable one stands in) and counted, never fatal.
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                return self.load(i), self.samples[i][1], i
            except UNREADABLE as e:
                self.num_skipped += 1
                log.warning("skipping unreadable image %s (%s); %d skipped in this process",
                            self.samples[i][0], e, self.num_skipped)
        raise RuntimeError(f"no readable image in {self.path}")
