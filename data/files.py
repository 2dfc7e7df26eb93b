"""Files written whole or not at all: a crash mid-write never leaves half a file under its final name.

Every file the project writes for others to read (configs, results, checkpoint metadata, statistics,
latent shards, datasets, exported weights) goes through `atomic_output`: the writer fills a
temporary file beside the target, which is flushed to disk, renamed into place and its folder
flushed. Readers see the old file or the new one, never a mix. Temporary names start with `.tmp-`,
so folder scans that look for finished files (checkpoints, cache shards) never pick one up.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

TMP_PREFIX = ".tmp-"


def fsync_path(path: str) -> None:
    """Flush a file's or a folder's contents (a folder: the names in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush every file under a folder to disk."""
    for parent, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(parent, name))


@contextlib.contextmanager
def atomic_output(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path beside `path` to write to; when the block ends without an exception the file
    is synced and renamed to `path`, otherwise removed. `suffix` ends the temporary name for writers that
    append an extension of their own (np.save adds .npy, np.savez .npz unless the name has it)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{os.path.basename(path)}{suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_path(directory)


def write_text(path: str, text: str) -> str:
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def write_json(path: str, obj, indent: int = 1) -> str:
    return write_text(path, json.dumps(obj, indent=indent))


def write_bytes(path: str, data: bytes) -> str:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path
