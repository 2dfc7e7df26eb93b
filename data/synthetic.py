"""Random inputs of a training set's shape and dtype (`data.synthetic`): throughput without a dataset.

`rectok profile` measures the model step with them; data loading has its own benchmarks
(benchmarks/ffcv_loader.py, benchmarks/latent_loader.py). Every batch of a size is the same tensor,
made once, so the loader costs nothing but the copy to the device a real batch also needs.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .folder import Batch

IMAGENET_TRAIN = 1_281_167  # the default length: epochs and schedules as long as ImageNet's
IMAGENET_VAL = 50_000


class SyntheticBatches:
    """`count` samples; item i has label i mod num_classes; inputs from `make(batch_size)`."""

    def __init__(self, make, count: int, num_classes: int):
        self.make, self.count = make, count
        self.labels = np.arange(count, dtype=np.int64) % num_classes
        self._buffers: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.count

    def batches(self, index_batches: list[list[int]], num_workers: int) -> Iterator[Batch]:
        for ids in index_batches:
            b = len(ids)
            if b not in self._buffers:
                x = self.make(b)
                self._buffers[b] = x.pin_memory() if torch.cuda.is_available() else x
            ids_t = torch.as_tensor(ids, dtype=torch.int64)
            yield self._buffers[b], torch.from_numpy(self.labels[ids]), ids_t


def synthetic_images(image_size: int, count: int = IMAGENET_TRAIN, num_classes: int = 1000) -> SyntheticBatches:
    """uint8 [B, 3, S, S] images, as the FFCV and PIL loaders yield them."""
    g = torch.Generator().manual_seed(0)
    return SyntheticBatches(lambda b: torch.randint(0, 256, (b, 3, image_size, image_size), dtype=torch.uint8,
                                                    generator=g), count, num_classes)


def synthetic_latents(channels: int, grid: int, count: int = IMAGENET_TRAIN, num_classes: int = 1000
                      ) -> SyntheticBatches:
    """bf16 [B, flip, (mean, logvar), C, h, w] moments, as the latent cache yields them."""
    g = torch.Generator().manual_seed(0)

    def make(b: int) -> torch.Tensor:
        x = torch.randn(b, 2, 2, channels, grid, grid, generator=g)
        x[:, :, 1] = -6.0  # logvar: a posterior std of 0.05, as a trained tokenizer's
        return x.to(torch.bfloat16)
    return SyntheticBatches(make, count, num_classes)
