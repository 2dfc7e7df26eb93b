"""`rectok data write-ffcv`: an image folder or list file -> one FFCV .beton of ADM-cropped images.

The crop is deterministic (docs/reference.md §3), so it is done once here instead of every epoch. Two passes over
the sources, both multi-process with a progress bar and an estimated finish time:
  1. every file is decoded once; unreadable ones are set aside and listed in the report.
     (FFCV's writer cannot skip a sample: a worker that raises leaves its main process waiting for
     ever, and every sample it was told about must be written.)
  2. FFCV's DatasetWriter writes the readable ones, cropped, as JPEG or raw pixels, into a temporary
     file renamed over the output only when complete.
The report (`OUT.report.json`) holds the counts, the class names (the loader reads them from it)
and every skipped file with the reason.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from .ffcv_loader import report_path, require_ffcv
from .files import atomic_output, write_json
from .images import DataError, decode_check, list_images, load_crop

log = logging.getLogger(__name__)

STORAGE = ("jpeg", "raw")
CHECK_CHUNK = 64  # images per pass-1 task: fewer round trips than one per image


def _check_all(paths: list[str]) -> list[tuple[str, str | None]]:
    return [(path, decode_check(path)) for path in paths]


def _worker_signals() -> None:
    """Pool initializer. A forked worker inherits its parent's handlers, and `rectok train` installs
    flag-only ones (trainer/engine/preemption.py) before it writes the default dataset: a worker that
    only sets a flag on TERM outlives Pool.terminate, and the parent waits in join for ever (issue 22).
    TERM kills, as terminate needs. USR2 (Slurm's time-limit warning, sent to every process of the job)
    and INT (Ctrl-C reaches the whole process group) are the parent's to act on: a worker killed by them
    would lose its task and leave the parent waiting for its result."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def worker_pool(workers: int) -> Iterator[mp.pool.Pool]:
    """A fork pool whose workers do not inherit the trainer's stop handlers (see _worker_signals). On
    success the workers end on the pool's sentinels (close, then join), not on a signal; on an error or
    Ctrl-C they are terminated."""
    before = {c.pid for c in mp.active_children()}
    pool = mp.get_context("fork").Pool(workers, initializer=_worker_signals)
    pool.worker_pids = {c.pid for c in mp.active_children()} - before  # the pool starts its workers at once
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def watched(pool: mp.pool.Pool, results: mp.pool.IMapIterator, poll_s: float = 2.0) -> Iterator:
    """The results of `pool.imap` (chunksize 1: only its iterator takes a timeout), failing instead of
    waiting for ever when a worker died (a TERM sent to the whole process group kills the workers, while
    the trainer itself only sets its stop flag): the pool replaces a dead worker, but the task it held
    never returns."""
    while True:
        try:
            yield results.next(timeout=poll_s)
        except StopIteration:
            return
        except mp.TimeoutError:
            if not pool.worker_pids <= {c.pid for c in mp.active_children()}:
                raise DataError("a worker of the dataset writer died (killed by a signal?); nothing was "
                                "written") from None


class _Cropped:
    """What FFCV's writer workers index: sample i -> (uint8 HWC crop, label). A file that fails now
    although it decoded in pass 1 (changed meanwhile) is flagged instead of raising, which would hang
    the writer; the flagged write is then discarded."""

    def __init__(self, samples: list[tuple[str, int]], size: int, failed):
        self.samples, self.size, self.failed = samples, size, failed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return load_crop(path, self.size), label
        except Exception:  # noqa: BLE001 - any failure in a writer worker would hang the whole write
            with self.failed.get_lock():
                self.failed.value += 1
            return np.zeros((self.size, self.size, 3), np.uint8), label


def write_ffcv(src: str, out: str, image_size: int = 256, storage: str = "jpeg", quality: int = 95,
               workers: int | None = None, root: str | None = None, progress: bool = True) -> dict:
    """Write `src` (a class folder or a list file) to the .beton `out`; returns the report."""
    require_ffcv()
    # ffcv is an optional extra (RECTOK_NO_FFCV=1 installs without it): imported where used.
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if storage not in STORAGE:
        raise DataError(f"storage must be one of {STORAGE}, got {storage!r}")
    if not 1 <= quality <= 100:
        raise DataError(f"JPEG quality must be in 1..100, got {quality}")
    if image_size < 1:
        raise DataError(f"image size must be >= 1, got {image_size}")
    workers = max(1, workers or os.cpu_count() or 1)
    t0 = time.perf_counter()
    samples, classes = list_images(src, root)
    log.info("write-ffcv: %d images from %s; pass 1/2 decodes each once to find unreadable ones", len(samples), src)

    skipped = []
    with worker_pool(workers) as pool:
        paths = [p for p, _ in samples]
        chunks = [paths[i:i + CHECK_CHUNK] for i in range(0, len(paths), CHECK_CHUNK)]
        bar = tqdm(total=len(samples), desc="check", unit="img", disable=not progress)
        for checked in watched(pool, pool.imap(_check_all, chunks)):
            bar.update(len(checked))
            for path, error in checked:
                if error is not None:
                    skipped.append({"path": path, "error": error})
                    log.warning("write-ffcv: skipping unreadable %s (%s)", path, error)
        bar.close()
    bad = {s["path"] for s in skipped}
    good = [s for s in samples if s[0] not in bad]
    if not good:
        raise DataError(f"no readable image in {src} ({len(skipped)} unreadable)")

    failed = mp.get_context("fork").Value("l", 0)
    fields = {"image": RGBImageField(write_mode="jpg" if storage == "jpeg" else "raw", jpeg_quality=quality),
              "label": IntField()}
    log.info("write-ffcv: pass 2/2 writes %d images (%s) to %s", len(good), storage, out)
    with atomic_output(out) as tmp:
        # FFCV's writer shows its own progress bar (with the remaining time) on stderr.
        DatasetWriter(tmp, fields, num_workers=workers).from_indexed_dataset(
            _Cropped(good, image_size, failed), chunksize=64)
        if failed.value:
            raise DataError(f"{failed.value} image(s) of {src} became unreadable during the write; nothing was "
                            f"written to {out}: run the command again")
    report = {"source": os.path.abspath(src), "output": os.path.abspath(out), "image_size": image_size,
              "storage": storage, "jpeg_quality": quality if storage == "jpeg" else None,
              "crop": "ADM centre crop (BOX halving, BICUBIC, centre)", "written": len(good),
              "skipped": len(skipped), "classes": classes, "seconds": round(time.perf_counter() - t0, 1),
              "skipped_files": skipped}
    write_json(report_path(out), report)
    log.info("write-ffcv: %d written, %d skipped (listed in %s), %.0f s", len(good), len(skipped),
             report_path(out), report["seconds"])
    return report
