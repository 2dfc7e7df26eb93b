"""One training per run directory (issue 22, case 5): the lock names a live holder and is taken over from
a dead one."""
import json
import os
import socket
import subprocess
import time

import pytest

from trainer.engine import run_lock
from trainer.engine.run_lock import LOCK, RunLock, RunLockedError

pytestmark = pytest.mark.quick


def _plant(run_dir, **holder):
    with open(os.path.join(run_dir, LOCK), "w") as f:
        json.dump(holder, f)


def test_a_live_holder_is_named_and_a_dead_one_is_replaced(tmp_path):
    other = subprocess.Popen(["sleep", "60"])
    try:
        _plant(tmp_path, host=socket.gethostname(), pid=other.pid, start=run_lock._start_time(other.pid))
        with pytest.raises(RunLockedError, match=f"pid {other.pid}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        other.kill()
        other.wait()
    lock = RunLock(str(tmp_path)).acquire()  # the holder is gone: stale
    with open(tmp_path / LOCK) as f:
        assert json.load(f)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    _plant(tmp_path, host=socket.gethostname(), pid=1, start="not-the-start-time-of-pid-1")
    RunLock(str(tmp_path)).acquire().release()


def test_another_host_is_trusted_until_its_refresh_stops(tmp_path, monkeypatch):
    _plant(tmp_path, host="node-elsewhere", pid=4242, start="1")
    with pytest.raises(RunLockedError, match="host node-elsewhere"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(tmp_path / LOCK, (old, old))  # the node was lost
    RunLock(str(tmp_path)).acquire().release()


def test_an_earlier_run_of_the_same_slurm_job_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    _plant(tmp_path, host="node-elsewhere", pid=4242, start="1", slurm_job="77")  # requeued onto another node
    RunLock(str(tmp_path)).acquire().release()
