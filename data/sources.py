"""One entry point from a configured split to a loader: FFCV for .beton files, PIL for image files.

Every training set (these, the latent cache of trainer/tasks/latents.py and data/synthetic.py) follows
the `TrainingSet` protocol of trainer/engine/protocols.py: `len()`, `labels` and
`batches(index_lists, num_workers)` yielding (inputs, labels, ids); images come as uint8
[B, 3, H, W] and are brought to [-1, 1] on the device (`to_model_range`).
"""
from __future__ import annotations

import torch

from .ffcv_loader import FFCVImages
from .folder import ImageFolderDataset
from .images import DataError

LOADERS = ("ffcv", "pil")


def open_images(path: str, loader: str, image_size: int, os_cache: bool = True):
    """A split for `loader`: a .beton for ffcv, a class folder or list file for pil."""
    if loader not in LOADERS:
        raise DataError(f"data.loader must be one of {LOADERS}, got {loader!r}")
    beton = path.endswith(".beton")
    if loader == "ffcv":
        if not beton:
            raise DataError(f"{path} is not a .beton file; the ffcv loader reads those: write one with "
                            f"`rectok data write-ffcv --src {path} --out FILE.beton --size {image_size}` and "
                            f"name it in data.train / data.val, or set data.loader=pil to decode {path} directly")
        return FFCVImages(path, image_size, os_cache)
    if beton:
        raise DataError(f"{path} is an FFCV file, read with data.loader=ffcv; the pil loader reads the image "
                        f"folder or list file it was written from")
    return ImageFolderDataset(path, image_size)


def load_batch(source, ids, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples `ids` of any training set as one batch: (inputs, labels)."""
    inputs, labels, _ = next(iter(source.batches([list(ids)], num_workers)))
    return inputs, labels
