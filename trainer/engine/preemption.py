"""The checkpoint signal and the record of a finished run.

Slurm sends USR2 `slurm.signal_delay_s` before a job's time limit (and on `scancel --signal=USR2`):
the job checkpoints and requeues itself. TERM comes with `scancel` and with preemption (after which
Slurm, under PreemptMode=REQUEUE, requeues the job by itself; its GraceTime is the time to save): the
job checkpoints and ends. INT (Ctrl-C, or torchrun passing it on) is handled as TERM; a second INT
exits at once. The handler only raises a flag: the training loop carries it in the step's
one all-reduce, so every rank sees it at the same step boundary, they save one complete checkpoint
together and stop. Saving inside the handler (submitit's way, on rank 0 alone) would start a
collective on one rank while the others are mid-step.

`done.json` in the run directory marks a run that reached its last step, with the hash of the config
it trained: `rectok sweep` skips exactly the variants whose resolved config finished.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time

import yaml

from data.files import write_json

log = logging.getLogger("rectok")

DONE = "done.json"
# Where and how a job runs does not change what it trains (issue 4: results do not depend on the world size).
NOT_HASHED = ("slurm",)


class StopRequest:
    """Set by the checkpoint signals; read by the training loop at every step boundary."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def install(self, signals=(signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)) -> StopRequest:
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        """The handlers from before `install` (a process that goes on after training, e.g. a test)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt("second Ctrl-C: stopping without a checkpoint")
        if self.signal is None:  # the first decides: a TERM at the time limit must not undo USR2's requeue
            log.warning("%s received: checkpointing at the next step boundary, then %s%s", name,
                        "requeueing" if name == "SIGUSR2" else "stopping",
                        " (Ctrl-C again stops at once, without it)" if signum == signal.SIGINT else "")
            self.signal = name

    @property
    def requeue(self) -> bool:
        """USR2 (the time limit is near) requeues the job; TERM does not (a cancel is meant, and Slurm
        requeues a preempted job itself)."""
        return self.signal == "SIGUSR2"

    def __bool__(self) -> bool:
        return self.signal is not None


def config_hash(config_yaml: str) -> str:
    """Hash of a resolved config (as `dump_config` writes it), ignoring the job's resources."""
    data = {k: v for k, v in yaml.safe_load(config_yaml).items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def write_done(run_dir: str, config_yaml: str, step: int, checkpoint: str, metrics: dict) -> None:
    write_json(os.path.join(run_dir, DONE), {"config_hash": config_hash(config_yaml), "step": step,
                                             "checkpoint": checkpoint, "metrics": metrics, "time": time.time()})


def read_done(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, DONE)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
