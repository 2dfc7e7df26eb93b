"""One writer per run directory: RUN/lock.json, created exclusively by the run's rank 0.

Two trainings in one run directory prune each other's checkpoints and interleave their metrics. The
lock file names its holder (host, pid, Slurm job) and a thread refreshes its time while the holder
lives. A lock is stale, and taken over, when its holder is gone: a process of this host that no
longer runs (or a new process under a reused pid), an earlier run of the same Slurm job (requeued,
perhaps onto another node), or a holder on another host that has not refreshed it for `STALE_AFTER_S`
(a lost node). A file lock (flock) would need no refresh but is not honoured by every cluster
filesystem; creating a file exclusively is.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time

from trainer.config.tree import ConfigError

log = logging.getLogger("rectok")

LOCK = "lock.json"
REFRESH_S = 30.0
STALE_AFTER_S = 300.0


class RunLockedError(ConfigError):
    """Another live training holds the run directory."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (telling a reused pid apart); None when it does not run."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.time()}


def _stale(holder: dict, mtime: float) -> str | None:
    """Why a lock's holder is gone, or None when it may still run."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job and holder.get("pid") != os.getpid():
        return f"an earlier run of Slurm job {job}"
    if holder.get("host") == socket.gethostname():
        if holder.get("pid") == os.getpid():
            return "taken by an earlier trainer of this process"  # tests and `rectok profile` build several
        start = _start_time(holder.get("pid", -1))
        if start is None or start != holder.get("start"):
            return f"process {holder.get('pid')} no longer runs"
        return None
    age = time.time() - mtime
    return f"not refreshed for {age:.0f} s" if age > STALE_AFTER_S else None


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def acquire(self) -> RunLock:
        """Takes the lock or raises RunLockedError naming the live holder."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = _holder()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, mtime = self._read()
                if holder is None:
                    continue  # removed between the two calls
                why = _stale(holder, mtime)
                if why is None:
                    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
                    raise RunLockedError(
                        f"{os.path.dirname(self.path)} is in use by another training (host {holder.get('host')}, "
                        f"pid {holder.get('pid')}{job}; {self.path}); wait for it or stop it (a lock whose holder "
                        f"stops refreshing it is taken over after {STALE_AFTER_S:.0f} s)") from None
                log.warning("taking over the stale lock %s (%s)", self.path, why)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            self._thread = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunLockedError(f"could not take the lock {self.path}: other processes keep taking it")

    def _read(self) -> tuple[dict | None, float]:
        try:
            mtime = os.path.getmtime(self.path)
            with open(self.path) as f:
                return json.load(f), mtime
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):
            return {}, mtime  # half-written by a holder that died at once: judged by its age alone

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder, _ = self._read()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.held = False

