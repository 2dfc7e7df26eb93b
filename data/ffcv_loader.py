"""The FFCV loader: a .beton of ADM-cropped images, decoded by FFCV's compiled pipeline on CPU threads.

It reads exactly the index lists it is given (data/order.py), in that order, so ranks, epochs,
resumption and evaluation are decided in one place for every loader. FFCV's own orders are not
used: its distributed order cannot start mid-epoch and its `drop_last=True` default silently drops
the tail of an evaluation.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .folder import Batch, workers_per_rank
from .images import DataError

INSTALL_HINT = ("install it with `apt-get install pkg-config libturbojpeg0-dev libopencv-dev` and "
                "`pip install ffcv==1.0.2` (scripts/setup.sh does both), or set data.loader=pil")


def report_path(beton: str) -> str:
    """What `rectok data write-ffcv` writes beside a .beton: counts, class names, skipped files."""
    return beton + ".report.json"


@contextmanager
def torch_threads_kept():
    """FFCV sets torch's intra-op thread count to its own worker count (on import, for every Loader
    and every epoch): left alone, a run with data.num_workers=1 would compute on one core."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def require_ffcv() -> None:
    """Import FFCV or say what is missing (FFCV builds against system libraries pip cannot install)."""
    try:
        with torch_threads_kept():
            import ffcv.loader  # noqa: F401  (slow, ~5 s: numba compiles its kernels on import)
    except ImportError as e:
        raise DataError(f"data.loader=ffcv but FFCV cannot be imported ({e}); {INSTALL_HINT}") from None


def check_layout(path: str) -> None:
    """Check a .beton against its own header before FFCV reads it (issue 22). FFCV takes a short file
    as it is: the samples whose bytes or allocation entries are cut off are then read out of bounds,
    as wrong images (os_cache) or as a crash of the whole process (abort, segfault). The file is
    header | field descriptors | per-sample metadata | pages | allocation table (ffcv/writer.py), the
    header holds the counts and the table's offset, and the table needs one (sample, ptr, size) entry
    per data pointer the metadata holds: its minimum length follows."""
    # ffcv is optional (require_ffcv has been called): imported where used.
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, get_handlers, get_metadata_type

    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        raise DataError(f"{path} is not a readable FFCV file ({size} bytes, shorter than FFCV's header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        return  # not FFCV's format: Reader says so

    def need(least: int, what: str) -> None:
        if size < least:
            raise DataError(f"{path} is truncated: {size} bytes, needs at least {least} ({what}); write it "
                            f"again with `rectok data write-ffcv`")

    fields_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    need(fields_end, "header and field descriptors")
    descriptors = np.fromfile(path, dtype=FieldDescType, count=int(header["num_fields"]), offset=HeaderType.itemsize)
    try:
        meta_type = get_metadata_type(get_handlers(descriptors))
    except (KeyError, AttributeError, TypeError, ValueError):
        return  # field types this FFCV does not know: Reader says so
    samples = int(header["num_samples"])
    need(fields_end + samples * meta_type.itemsize, f"the metadata of {samples} samples")
    meta = np.fromfile(path, dtype=meta_type, count=samples, offset=fields_end)
    pointers = np.unique(np.concatenate([np.zeros(0, np.uint64)] + [
        meta[name]["data_ptr"] for name in meta_type.names
        if meta_type[name].names and "data_ptr" in meta_type[name].names]))
    table = int(header["alloc_table_ptr"])
    need(table + len(pointers) * ALLOC_TABLE_TYPE.itemsize,
         f"{len(pointers)} allocation entries from byte {table}")
    entries = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table)
    if not np.isin(pointers, entries["ptr"]).all() or (entries["ptr"] + entries["size"] > table).any():
        raise DataError(f"{path} is damaged: its allocation table does not match its samples; write it again "
                        f"with `rectok data write-ffcv`")


class FFCVImages:
    """A split written by `rectok data write-ffcv`: sample i -> (uint8 [3, size, size], label)."""

    def __init__(self, path: str, image_size: int, os_cache: bool = True):
        require_ffcv()
        from ffcv.reader import Reader
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FFCV file not found: {path} (write it with `rectok data write-ffcv`)")
        try:
            check_layout(path)
            reader = Reader(path)
        except DataError:
            raise
        except (AssertionError, ValueError, IndexError, OSError) as e:
            raise DataError(f"{path} is not a readable FFCV file ({type(e).__name__}: {e})") from None
        if list(reader.handlers) != ["image", "label"]:
            raise DataError(f"{path} has fields {list(reader.handlers)}; `rectok data write-ffcv` writes "
                            f"['image', 'label']")
        image, label = reader.metadata["f0"], reader.metadata["f1"]
        sizes = set(zip(image["height"].tolist(), image["width"].tolist()))
        if sizes != {(image_size, image_size)}:
            raise DataError(f"{path} holds images of {sorted(sizes)[:3]} (height, width); the model needs "
                            f"{image_size}x{image_size}: write it with --size {image_size}")
        self.path, self.image_size, self.os_cache = path, image_size, os_cache
        self.labels = np.asarray(label, dtype=np.int64)
        self.classes = None
        if os.path.isfile(report_path(path)):
            with open(report_path(path)) as f:
                self.classes = json.load(f).get("classes")
        self._loaders: dict[tuple[int, int], object] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def _loader(self, batch_size: int, threads: int):
        """One FFCV Loader per (batch size, threads), kept: building one compiles its pipeline (~1 s)."""
        key = (batch_size, threads)
        if key not in self._loaders:
            from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.transforms import Squeeze, ToTensor, ToTorchImage
            from ffcv.traversal_order.base import TraversalOrder

            class Planned(TraversalOrder):
                plan = np.zeros(0, dtype=np.int64)

                def sample_order(self, epoch: int):
                    return self.plan

            # Built with the sequential order over every sample (its length bounds every later plan),
            # then given the planned order; Loader accepts no custom order instance directly.
            with torch_threads_kept():
                loader = Loader(self.path, batch_size=batch_size, num_workers=threads, order=OrderOption.SEQUENTIAL,
                                drop_last=False, os_cache=self.os_cache,
                                pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()],
                                           "label": [IntDecoder(), ToTensor(), Squeeze()]})
            loader.traversal_order = Planned(loader)
            self._loaders[key] = loader
        return self._loaders[key]

    def batches(self, index_batches: list[list[int]], num_workers: int | str) -> Iterator[Batch]:
        """The given index lists, in order (all the same size but the last), as batches the caller owns."""
        if not index_batches:
            return
        size = len(index_batches[0])
        if any(len(b) != size for b in index_batches[:-1]) or not 0 < len(index_batches[-1]) <= size:
            raise ValueError("FFCV batches must all have the same size (the last may be smaller)")
        import numba
        threads = max(1, min(workers_per_rank(num_workers), numba.config.NUMBA_NUM_THREADS))
        loader = self._loader(size, threads)
        loader.traversal_order.plan = np.concatenate([np.asarray(b, dtype=np.int64) for b in index_batches])
        pin = torch.cuda.is_available()  # page-locked, so the copy to the GPU can overlap compute
        with torch_threads_kept():
            it = iter(loader)
        try:
            for ids, (images, labels) in zip(index_batches, it):
                # FFCV reuses its output buffers a few batches later: copy out (also NHWC -> NCHW memory).
                own = torch.empty(images.shape, dtype=images.dtype, pin_memory=pin).copy_(images)
                yield own, labels.to(torch.int64, copy=True), torch.as_tensor(ids, dtype=torch.int64)
        finally:
            it.close()
