"""Atomic checkpoints (single process): a crash while writing leaves the previous one intact;
keep-last-K plus milestones. The multi-rank versions are in test_distributed.py."""
import os

import pytest

import trainer.engine.checkpoint as ck
from trainer.engine.distributed import DistEnv

pytestmark = pytest.mark.quick

ENV = DistEnv()


def writer(value):
    def write(directory):
        with open(os.path.join(directory, "payload"), "w") as f:
            f.write(str(value))
    return write


def payload(directory):
    with open(os.path.join(ck.resolve_checkpoint(directory), "payload")) as f:
        return f.read()


def save(run, step, keep_last=3, milestone=False, write=None):
    return ck.save_checkpoint(run, step, write or writer(step), {"format": "test"}, keep_last, ENV, milestone)


def test_save_list_prune_keeps_milestones_and_resolves(tmp_path):
    run = str(tmp_path)
    for step in (10, 20, 30, 40, 50):
        save(run, step, keep_last=2, milestone=step == 20)
    assert [s for s, _ in ck.list_complete(run)] == [20, 40, 50]  # 20 is a milestone, kept forever
    assert payload(run) == "50" and ck.read_meta(run)["step"] == 50
    assert payload(os.path.join(run, "checkpoints", "step_00000040")) == "40"


def test_crash_mid_write_keeps_previous(tmp_path):
    run = str(tmp_path)
    save(run, 10)

    def dying(directory):
        with open(os.path.join(directory, "payload"), "w") as f:
            f.write("partial")
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        save(run, 20, write=dying)
    assert ck.latest_checkpoint(run).endswith("step_00000010") and payload(run) == "10"
    assert [n for n in os.listdir(ck.checkpoint_root(run)) if n.startswith(".tmp-")]  # never taken for a checkpoint
    save(run, 30)
    assert payload(run) == "30"
    assert not [n for n in os.listdir(ck.checkpoint_root(run)) if n.startswith(".tmp-")]  # cleaned by the next save


def test_incomplete_directory_is_ignored(tmp_path):
    run = str(tmp_path)
    save(run, 10)
    bad = os.path.join(ck.checkpoint_root(run), "step_00000099")
    os.makedirs(bad)
    writer(99)(bad)  # no COMPLETE marker
    assert payload(run) == "10"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ck.resolve_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.resolve_checkpoint(str(tmp_path / "nothing"))
