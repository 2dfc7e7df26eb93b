"""Atomic, sharded checkpoints: every rank writes its shards under a temporary name; rank 0 marks the
directory complete and renames it into place only after all ranks finished.

Layout: RUN/checkpoints/step_00001234/{meta.json, rng/rank_00000.pt, state/ (DCP) | deepspeed/, COMPLETE}.
A crash while writing leaves only `.tmp-step_*`, which is never picked up and is removed by the next
save; the last good checkpoint is untouched. Auto-resume takes the newest directory with its
COMPLETE marker. Pruning keeps the newest `keep_last` plus every milestone (a MILESTONE file).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable

import numpy as np
import torch

from data.files import TMP_PREFIX, fsync_path, fsync_tree, write_json
from trainer.config.recipes import parse_saved_config, with_overrides
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError

from .distributed import DistEnv, barrier

MARKER, MILESTONE, META = "COMPLETE", "MILESTONE", "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
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


def save_checkpoint(run_dir: str, step: int, write: Callable[[str], None], meta: dict, keep_last: int,
                    env: DistEnv, milestone: bool = False) -> str:
    """Called by every rank together. `write(directory)` writes this rank's part (collectively)."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    if os.path.isfile(os.path.join(final, MARKER)):
        return final  # this step is already saved (a resumed run reaching its own save point)
    tmp = os.path.join(root, f"{TMP_PREFIX}step_{step:08d}")
    if env.main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    write(tmp)
    fsync_tree(tmp)
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    barrier()  # every rank's shards are on disk
    if env.main:
        write_json(os.path.join(tmp, META), {**meta, "step": step, "world": env.world, "time": time.time()})
        if milestone:
            write_json(os.path.join(tmp, MILESTONE), {"step": step})
        write_json(os.path.join(tmp, MARKER), {"step": step})
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of the same name
        os.rename(tmp, final)
        fsync_path(root)
        _prune(root, run_dir, keep_last)
    barrier()
    return final


def _prune(root: str, run_dir: str, keep_last: int) -> None:
    for _, path in list_complete(run_dir)[:-keep_last]:
        if not os.path.isfile(os.path.join(path, MILESTONE)):
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # left by a crashed save


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    os.makedirs(os.path.dirname(rng_path(directory, rank)), exist_ok=True)
    torch.save(state, rng_path(directory, rank))


def load_rng(directory: str, rank: int) -> bool:
    """Restores this rank's generators; False when the checkpoint had fewer ranks than this run."""
    path = rng_path(directory, rank)
    if not os.path.isfile(path):
        return False
    state = torch.load(path, weights_only=False)  # our own file: Python RNG states need the full unpickler
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True
