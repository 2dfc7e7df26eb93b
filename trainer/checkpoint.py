"""Atomic checkpoints: written under a temporary name, renamed into place only once complete.

Layout: RUN/checkpoints/step_00001234/{state.pt, COMPLETE}. A crash while writing leaves only a
`.tmp-*` directory behind, which is never picked up and is cleaned later; the last good checkpoint
is untouched. Auto-resume takes the newest directory that has its COMPLETE marker.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch

STATE_FILE, MARKER = "state.pt", "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def save_checkpoint(run_dir: str, step: int, state: dict, keep_last: int) -> str:
    root = checkpoint_root(run_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    if os.path.isfile(os.path.join(final, MARKER)):
        return final  # this step is already saved (a resumed run reaching its own save point)
    tmp = os.path.join(root, f".tmp-step_{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    path = os.path.join(tmp, STATE_FILE)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"step": step, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of the same name
    os.rename(tmp, final)
    _fsync_dir(root)
    _prune(root, run_dir, keep_last)
    return final


def _prune(root: str, run_dir: str, keep_last: int) -> None:
    for _, path in list_complete(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(".tmp-") and not name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # left by a crashed writer


def resolve_checkpoint(path: str) -> str:
    """A run directory, a checkpoint directory or a state file -> the state file to load."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise FileNotFoundError(f"checkpoint {path} is incomplete (no {MARKER} marker)")
        return os.path.join(path, STATE_FILE)
    latest = latest_checkpoint(path) if os.path.isdir(path) else None
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    return os.path.join(latest, STATE_FILE)


def load_state(path: str) -> dict:
    # Our own files: they hold Python RNG states, so the full unpickler is needed.
    return torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=False)


def model_weights(state: dict, use_ema: bool) -> dict:
    """The trained model's weights in a loaded checkpoint state: its EMA, or the raw ones."""
    return state["ema"] if use_ema else state["modules"]["model"]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
