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
    path = ck.save_checkpoint(run, step, write or writer(step), {"format": "test"}, ENV, milestone)
    ck.prune_checkpoints(run, keep_last)
    return path


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


# -- integrity (issue 22) ------------------------------------------------------------------------------
def test_checksums_find_garbage_truncation_and_missing_files(tmp_path):
    run = str(tmp_path)
    path = save(run, 10, write=lambda d: [writer("x" * 10_000)(d), os.makedirs(os.path.join(d, "rng"))])
    assert ck.verify_checkpoint(path) is None
    with open(os.path.join(path, "payload"), "r+b") as f:
        f.seek(5000)
        f.write(b"garbage!")
    assert "sha256" in ck.verify_checkpoint(path)
    with open(os.path.join(path, "payload"), "r+b") as f:
        f.truncate(100)
    assert "100 bytes, 10000 were written" in ck.verify_checkpoint(path)
    os.remove(os.path.join(path, "payload"))
    assert "payload is missing" in ck.verify_checkpoint(path)
    writer("x" * 10_000)(path)  # the original bytes back
    assert ck.verify_checkpoint(path) is None
    with open(os.path.join(path, "latent_stats.json"), "w") as f:  # kept beside a tokenizer's weights later
        f.write("{}")
    assert ck.verify_checkpoint(path) is None


def test_newest_verified_and_readers_skip_a_damaged_checkpoint(tmp_path):
    run = str(tmp_path)
    save(run, 10)
    newest = save(run, 20)
    with open(os.path.join(newest, "payload"), "w") as f:
        f.write("21")  # same size, other bytes
    good, problems = ck.newest_verified(run)
    assert good.endswith("step_00000010") and problems[0].startswith("step_00000020: payload")
    assert ck.verified_checkpoint(run) == good  # a run directory: its newest good checkpoint
    with pytest.raises(ck.CheckpointError, match="step_00000020 is damaged"):
        ck.verified_checkpoint(newest)  # a named checkpoint: no silent substitute
    moved = ck.reject_checkpoint(newest, "test")
    assert os.path.basename(moved) == "rejected_step_00000020" and ck.latest_checkpoint(run) == good
    assert payload(save(run, 20)) == "20"  # the step can be saved again


def test_prune_keeps_the_newest_and_milestones(tmp_path):
    run = str(tmp_path)
    for step in (10, 20, 30):
        ck.save_checkpoint(run, step, writer(step), {"format": "test"}, ENV, milestone=step == 10)
    assert [s for s, _ in ck.list_complete(run)] == [10, 20, 30]  # saving alone prunes nothing
    ck.prune_checkpoints(run, 1)
    assert [s for s, _ in ck.list_complete(run)] == [10, 30]


def test_rng_state_round_trips_as_plain_tensors_and_a_pickle_is_refused(tmp_path):
    import random

    import numpy as np
    import torch
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ck.save_rng(str(tmp_path), 0)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert ck.load_rng(str(tmp_path), 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    # Case 8: a pickle that runs code when loaded, in place of the RNG state.
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"python": Evil()}, ck.rng_path(str(tmp_path), 0))
    from models.weights import UnreadableWeightsError
    with pytest.raises(UnreadableWeightsError, match="rank_00000.pt stores Python objects"):
        ck.load_rng(str(tmp_path), 0)
    assert not marker.exists()


def test_config_changes_list_what_a_resume_may_not_change():
    from trainer.config.recipes import dump_config, load_config
    saved = dump_config(load_config("rectok/tiny_stage1"))
    assert ck.config_changes(saved, load_config("rectok/tiny_stage1", [
        "run.max_steps=7", "logging.log_every=3", "parallel.strategy=fsdp", "data.num_workers=0"])) == []
    changed = load_config("rectok/tiny_stage1", ["model.latent_channels=32", "optim.base_lr=1e-3",
                                                 "data.global_batch=64"])
    assert ck.config_changes(saved, changed) == [
        "data.global_batch: 32 -> 64", "model.latent_channels: 16 -> 32", "optim.base_lr: 0.008 -> 0.001"]


def test_truncate_metrics_drops_rows_past_the_resumed_step(tmp_path):
    from trainer.engine.tracking import METRICS, read_metrics, truncate_metrics
    with open(tmp_path / METRICS, "w") as f:
        f.write("".join(f'{{"step": {s}}}\n' for s in (0, 1, 2, 3, 4)) + '{"step": 5, "tot')  # cut by a kill
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4]  # the cut line skipped
    assert truncate_metrics(str(tmp_path), 2) == 3
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2]
