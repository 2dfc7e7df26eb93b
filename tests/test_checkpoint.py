"""Atomic checkpoints: a crash while writing leaves the previous one intact; keep-last-K."""
import os

import pytest
import torch

import trainer.checkpoint as ck


def test_save_list_prune_and_resolve(tmp_path):
    run = str(tmp_path)
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(run, step, {"step": step}, keep_last=2)
    assert [s for s, _ in ck.list_complete(run)] == [30, 40]
    assert ck.load_state(run)["step"] == 40
    assert ck.load_state(os.path.join(run, "checkpoints", "step_00000030"))["step"] == 30


def test_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    run = str(tmp_path)
    ck.save_checkpoint(run, 10, {"w": torch.ones(3)}, keep_last=3)

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(run, 20, {"w": torch.zeros(3)}, keep_last=3)
    monkeypatch.undo()
    assert ck.latest_checkpoint(run).endswith("step_00000010")
    assert torch.equal(ck.load_state(run)["w"], torch.ones(3))
    leftovers = [n for n in os.listdir(ck.checkpoint_root(run)) if n.startswith(".tmp-")]
    assert leftovers  # the half-written directory is never mistaken for a checkpoint ...
    ck.save_checkpoint(run, 30, {"w": torch.full((3,), 3.0)}, keep_last=3)
    assert ck.load_state(run)["w"][0] == 3.0


def test_incomplete_directory_is_ignored(tmp_path):
    run = str(tmp_path)
    ck.save_checkpoint(run, 10, {"step": 10}, keep_last=3)
    bad = os.path.join(ck.checkpoint_root(run), "step_00000099")
    os.makedirs(bad)
    torch.save({"step": 99}, os.path.join(bad, ck.STATE_FILE))  # no COMPLETE marker
    assert ck.load_state(run)["step"] == 10
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ck.resolve_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.resolve_checkpoint(str(tmp_path / "nothing"))
