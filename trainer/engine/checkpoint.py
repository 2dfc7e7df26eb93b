"""Atomic, checksummed, sharded checkpoints: every rank writes its shards under a temporary name; the
ranks hash the files together; rank 0 records the hashes, marks the directory complete and renames it
into place only after all ranks finished.

Layout: RUN/checkpoints/step_00001234/{meta.json, rng/rank_00000.pt, state/ (DCP) | deepspeed/, COMPLETE}.
A crash while writing leaves only `.tmp-step_*`, which is never picked up and is removed by the next
save; the last good checkpoint is untouched. meta.json holds the size and sha256 of every other file:
whatever reads a checkpoint (resume, stage-2 initialisation, sampling, export) verifies them first, and
resume falls back to the newest checkpoint that verifies. A checkpoint found damaged, or whose weights
produced a non-finite loss at once, is moved aside to `rejected_step_*` (kept for inspection, never
loaded again). Pruning (`prune_checkpoints`) keeps the newest `keep_last` plus every milestone (a
MILESTONE file); the training loop calls it only once a step has run from the newest checkpoint with a
finite loss, so a diverged checkpoint never replaces the last good one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from data.files import TMP_PREFIX, fsync_path, fsync_tree, write_json
from models.weights import read_checkpoint
from trainer.config.recipes import dump_config, parse_saved_config, with_overrides
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError, to_dict

from .distributed import DistEnv, active, barrier

log = logging.getLogger("rectok")

MARKER, MILESTONE, META, REJECTED = "COMPLETE", "MILESTONE", "meta.json", "REJECTED.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_NOT_HASHED = (MARKER, MILESTONE, META)  # written after the hashes, by rank 0, as small JSON
# Test hook: every rank kills itself after writing its shards of this step, before the marker.
KILL_ENV = "RECTOK_TEST_KILL_DURING_SAVE"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_complete(run_dir: str) -> list[tuple[int, str]]:
    """(step, directory) of complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, MARKER)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> str | None:
    done = list_complete(run_dir)
    return done[-1][1] if done else None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, incomplete, or none that verifies."""


def library_error(e: BaseException) -> BaseException:
    """The first rank's own error inside the checkpoint library's CheckpointException (which holds one per
    rank and prints them all as tracebacks); other errors unchanged."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return library_error(inner)
    return e


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _hashed_files(directory: str) -> list[str]:
    """Paths (relative, sorted) of the files a checkpoint's checksums cover."""
    out = []
    for parent, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(parent, name), directory)
            if rel not in _NOT_HASHED and rel != REJECTED:
                out.append(rel)
    return sorted(out)


def file_checksums(directory: str) -> dict[str, list]:
    """{relative path: [size, sha256]} of a checkpoint's files. Called by every rank together when a
    process group is active: each hashes every world-th file, so a large checkpoint hashes in parallel."""
    files = _hashed_files(directory)
    rank, world = (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)
    mine = {rel: [os.path.getsize(os.path.join(directory, rel)), _hash_file(os.path.join(directory, rel))]
            for rel in files[rank::world]}
    if world == 1:
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def verify_checkpoint(directory: str) -> str | None:
    """What is wrong with a checkpoint directory (one line), or None when every file matches its record.
    Checkpoints from before checksums existed pass with a warning."""
    if not os.path.isfile(os.path.join(directory, MARKER)):
        return f"incomplete (no {MARKER} marker)"
    try:
        with open(os.path.join(directory, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return f"{META} is unreadable ({type(e).__name__}: {e})"
    expected = meta.get("checksums")
    if expected is None:
        log.warning("%s has no checksums (written before they existed): not verified", directory)
        return None
    for rel, (size, digest) in sorted(expected.items()):
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, {size} were written (truncated or overwritten)"
        if _hash_file(path) != digest:
            return f"{rel} does not match its sha256 (the file was damaged after it was written)"
    return None  # files added later (the latent statistics a tokenizer checkpoint keeps) are not loaded with it


def save_checkpoint(run_dir: str, step: int, write: Callable[[str], None], meta: dict, env: DistEnv,
                    milestone: bool = False) -> str:
    """Called by every rank together. `write(directory)` writes this rank's part (collectively). Nothing
    is pruned here: see `prune_checkpoints`."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    if os.path.isfile(os.path.join(final, MARKER)):
        return final  # this step is already saved (a resumed run reaching its own save point)
    tmp = os.path.join(root, f"{TMP_PREFIX}step_{step:08d}")
    if env.main:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # left by a crashed save
        os.makedirs(tmp)
    barrier()
    write(tmp)
    fsync_tree(tmp)
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    barrier()  # every rank's shards are on disk
    checksums = file_checksums(tmp)  # read back from disk: what a later load will find
    if env.main:
        write_json(os.path.join(tmp, META), {**meta, "step": step, "world": env.world, "time": time.time(),
                                             "checksums": checksums})
        if milestone:
            write_json(os.path.join(tmp, MILESTONE), {"step": step})
        write_json(os.path.join(tmp, MARKER), {"step": step})
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of the same name
        os.rename(tmp, final)
        fsync_path(root)
    barrier()
    return final


def prune_checkpoints(run_dir: str, keep_last: int) -> None:
    """Deletes complete checkpoints but the newest `keep_last` and the milestones (rank 0 alone)."""
    for _, path in list_complete(run_dir)[:-keep_last]:
        if not os.path.isfile(os.path.join(path, MILESTONE)):
            shutil.rmtree(path, ignore_errors=True)


def reject_checkpoint(directory: str, reason: str) -> str:
    """Moves a checkpoint aside (rank 0 alone): it is kept for inspection but never loaded, resumed from
    or pruned, and a resumed run may save its step again."""
    parent, name = os.path.split(os.path.normpath(directory))
    target, n = os.path.join(parent, f"rejected_{name}"), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(parent, f"rejected_{name}.{n}")
    os.rename(directory, target)
    write_json(os.path.join(target, REJECTED), {"reason": reason, "time": time.time()})
    fsync_path(parent)
    log.error("checkpoint %s rejected (%s): moved to %s", directory, reason, target)
    return target


def newest_verified(run_dir: str, below: int | None = None) -> tuple[str | None, list[str]]:
    """(the newest complete checkpoint whose files verify, [problems of newer ones]); `below`: only
    checkpoints of earlier steps."""
    problems = []
    for step, path in reversed(list_complete(run_dir)):
        if below is not None and step >= below:
            continue
        problem = verify_checkpoint(path)
        if problem is None:
            return path, problems
        problems.append(f"{os.path.basename(path)}: {problem}")
    return None, problems


def resolve_checkpoint(path: str) -> str:
    """A run directory or a checkpoint directory -> the complete checkpoint directory to load."""
    if _STEP_DIR.match(os.path.basename(os.path.normpath(path))) and os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise FileNotFoundError(f"checkpoint {path} is incomplete (no {MARKER} marker)")
        return path
    latest = latest_checkpoint(path) if os.path.isdir(path) else None
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    return latest


def verified_checkpoint(path: str) -> str:
    """`resolve_checkpoint`, with the files checked against their checksums: a checkpoint directory that
    fails is an error; for a run directory, the newest checkpoint that verifies (the others reported)."""
    directory = resolve_checkpoint(path)
    if _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        problem = verify_checkpoint(directory)
        if problem:
            raise CheckpointError(f"checkpoint {directory} is damaged: {problem}")
        return directory
    good, problems = newest_verified(path)
    for p in problems:
        log.warning("%s: skipping checkpoint %s", path, p)
    if good is None:
        raise CheckpointError(f"no checkpoint in {path} verifies: " + "; ".join(problems))
    return good


# What a resumed run may change without changing what it trains: where and how it runs, what it logs,
# evaluates and samples, and how long it goes on. Anything else (model, data, schedule, optimizer, losses,
# seed) would silently mix two recipes in one run.
RESUMABLE_CHANGES = ("run.max_steps", "run.device", "run.output_dir", "data.num_workers", "data.micro_batch",
                     "data.ffcv_os_cache", "parallel.", "checkpoint.", "logging.", "eval.", "sample.", "slurm.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved_yaml: str, cfg: TrainConfig) -> list[str]:
    """'key: checkpoint value -> this run's value' for every key a resumed run may not change."""
    if saved_yaml == dump_config(cfg):
        return []
    try:
        old = _flat(to_dict(parse_saved_config(saved_yaml)))
    except ConfigError as e:
        return [f"the checkpoint's config does not parse ({e})"]
    new = _flat(to_dict(cfg))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r))
                                                    for r in RESUMABLE_CHANGES)]


def run_dir_of(path: str) -> str:
    """The run directory of a run or checkpoint directory (RUN/checkpoints/step_N -> RUN)."""
    return os.path.dirname(os.path.dirname(resolve_checkpoint(path)))


def read_meta(path: str) -> dict:
    with open(os.path.join(resolve_checkpoint(path), META)) as f:
        return json.load(f)


def saved_config(path: str, overrides: list[str] = (), task: str | None = None) -> TrainConfig:
    """The config a checkpoint was trained with, `overrides` applied (data.*, eval.*, sample.*, run.device):
    how evaluation, sampling and reports reuse a run. `task`: the kind of run the caller reads."""
    cfg = with_overrides(parse_saved_config(read_meta(path)["config"]), overrides)
    if task is not None and cfg.task != task:
        raise ConfigError(f"{resolve_checkpoint(path)} holds a {cfg.task!r} run, not a {task} run")
    return cfg


def rng_path(directory: str, rank: int) -> str:
    return os.path.join(directory, "rng", f"rank_{rank:05d}.pt")


def save_rng(directory: str, rank: int) -> None:
    """This rank's generators as tensors and numbers only: read back with weights_only (no code)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    os.makedirs(os.path.dirname(rng_path(directory, rank)), exist_ok=True)
    torch.save(state, rng_path(directory, rank))


def load_rng(directory: str, rank: int) -> bool:
    """Restores this rank's generators; False when the checkpoint had fewer ranks than this run."""
    path = rng_path(directory, rank)
    if not os.path.isfile(path):
        return False
    state = read_checkpoint(path, "RNG state")  # tensors and numbers only: a pickle with code is refused
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True
