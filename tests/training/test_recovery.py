"""Nothing lost (issue 22): damaged checkpoints are set aside and the run resumes from the newest good one,
a diverged run never replaces its last good checkpoint, Ctrl-C saves, one training per run directory,
metrics without repeated rows, a changed recipe refused on resume, and one clear line for each failure.

The runs are the micro tokenizer of conftest.py cut to 8 steps, a checkpoint every 3.
"""
import glob
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from conftest import micro_overrides, wait_until

from trainer.cli import main
from trainer.config.recipes import load_config
from trainer.engine.checkpoint import META, REJECTED, file_checksums, list_complete, verify_checkpoint
from trainer.engine.loop import NonFiniteStateError
from trainer.engine.run_lock import LOCK
from trainer.engine.tracking import read_metrics
from trainer.tasks.training import build_trainer, train

SHORT = ["run.max_steps=8", "checkpoint.every_steps=3", "checkpoint.keep_last=1", "eval.every_epochs=0"]


def _run(micro, name, *extra):
    return load_config("rectok/tiny_stage1", micro + SHORT + [f"run.name={name}", *extra])


def _weights(run_dir):
    """The final raw and EMA weights of a run, as its newest checkpoint holds them."""
    from trainer.parallel.consolidate import load_state
    state = load_state(run_dir)
    return {**{f"raw.{k}": v for k, v in state["modules"]["generator"].items()},
            **{f"ema.{k}": v for k, v in state["ema"].items()}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset_dir):
    """An undisturbed run of the micro recipe (its overrides rebuilt here: `micro` is per test)."""
    over = micro_overrides(tmp_path_factory.mktemp("reference"), dataset_dir)
    return _weights(train(_run(over, "reference"))["run_dir"])


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _printed(capsys) -> dict:
    """The JSON result `rectok` printed last, after the log lines."""
    out = "\n" + capsys.readouterr().out
    return json.loads(out[out.rindex("\n{") + 1:])


def _distcp(checkpoint):
    return sorted(glob.glob(os.path.join(checkpoint, "state", "*.distcp")))[0]


def _damage_garbage(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096))


def _damage_truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [_damage_garbage, _damage_truncate], ids=["garbage", "truncated"])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(micro, reference, damage):
    """Cases 1 and 3: 4 KB of garbage in the middle of the newest .distcp (it resumed silently and trained NaN),
    or the file cut short (EOFError from the checkpoint library). Now its checksum fails, it is moved to
    rejected_step_*, the run resumes from the step before, and ends with the undisturbed run's weights."""
    part = train(_run(micro, "damaged", "run.max_steps=6"))["run_dir"]
    assert [s for s, _ in list_complete(part)] == [3, 6]  # the newest is kept with the one before it
    damage(_distcp(os.path.join(part, "checkpoints", "step_00000006")))
    assert "state/" in verify_checkpoint(os.path.join(part, "checkpoints", "step_00000006"))
    resumed = build_trainer(_run(micro, "damaged"))
    assert resumed.step == 3
    result = resumed.fit()
    assert result["step"] == 8 and all(v == v for v in result.values() if isinstance(v, float))  # no NaN
    rejected = os.path.join(part, "checkpoints", "rejected_step_00000006")
    with open(os.path.join(rejected, REJECTED)) as f:
        assert json.load(f)["reason"].startswith("state/")  # names the damaged file
    _assert_same(_weights(part), reference)
    steps = [r["step"] for r in read_metrics(part) if "total" in r]
    assert steps == list(range(1, 9))  # case 5: steps 4-6 were logged twice before; now once


def test_a_checkpoint_that_fails_to_load_is_set_aside(micro, reference):
    """A checkpoint without checksums (written before they existed) whose shard is cut short passes
    verification, fails inside the checkpoint library, and is set aside for the one before it."""
    part = train(_run(micro, "legacy", "run.max_steps=6"))["run_dir"]
    newest = os.path.join(part, "checkpoints", "step_00000006")
    meta_path = os.path.join(newest, META)
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["checksums"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    _damage_truncate(_distcp(newest))
    resumed = build_trainer(_run(micro, "legacy"))
    assert resumed.step == 3 and os.path.isdir(os.path.join(part, "checkpoints", "rejected_step_00000006"))
    resumed.fit()
    _assert_same(_weights(part), reference)


def test_readers_refuse_a_damaged_checkpoint_and_fall_back_within_a_run(micro, tmp_path, capsys):
    """export / sample / eval / init_from read through one verified loader."""
    part = train(_run(micro, "readers", "run.max_steps=6"))["run_dir"]
    newest = os.path.join(part, "checkpoints", "step_00000006")
    _damage_garbage(_distcp(newest))
    assert main(["export", newest, "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "damaged" in capsys.readouterr().err and not os.path.exists(tmp_path / "w.safetensors")
    assert main(["export", part, "--out", str(tmp_path / "w.safetensors")]) == 0  # the run's newest good one
    assert json.loads(capsys.readouterr().out)["step"] == 3
    # Case 7: a .metadata that runs code when unpickled, its checksum rewritten to match: refused, not run.
    older = os.path.join(part, "checkpoints", "step_00000003")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(os.path.join(older, "state", ".metadata"), "wb") as f:
        pickle.dump(Evil(), f)
    with open(os.path.join(older, META)) as f:
        meta = json.load(f)
    meta["checksums"] = file_checksums(older)
    with open(os.path.join(older, META), "w") as f:
        json.dump(meta, f)
    assert verify_checkpoint(older) is None
    assert main(["export", older, "--out", str(tmp_path / "w2.safetensors")]) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()


def test_diverging_run_keeps_its_last_good_checkpoint(micro, capsys):
    """Case 2: optim.base_lr=1e30 with keep_last=1. Finite weights of 1e28 were saved and the good checkpoint
    pruned; resuming gave NaN at once. Now the checkpoint whose weights gave the NaN is set aside, the one
    before it stays, and a restart with a sane learning rate resumes from it."""
    args = ["train", "rectok/tiny_stage1", *micro, "run.name=diverge", "checkpoint.every_steps=1",
            "checkpoint.keep_last=1", "eval.every_epochs=0"]
    assert main(args + ["optim.base_lr=1e30"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rectok: error:")]
    assert len(err) == 1 and "non-finite loss at step" in err[0] and "moved to" in err[0], err
    run = os.path.join(micro[0].split("=", 1)[1], "diverge")
    good = list_complete(run)
    assert good and all(verify_checkpoint(p) is None for _, p in good)
    assert glob.glob(os.path.join(run, "checkpoints", "rejected_step_*"))
    assert main(args + ["run.max_steps=4", "--allow-config-change"]) == 0
    assert _printed(capsys)["step"] == 4


def test_nonfinite_weights_are_never_saved(micro):
    """Corrupt optimizer state (as garbage in a shard once caused) makes the weights NaN while the loss of
    that step was still finite: the save refuses them and the good checkpoint stays."""
    tr = build_trainer(_run(micro, "poisoned", "checkpoint.every_steps=2"))
    real = tr.task.losses

    def poison(x, step):
        if step == 3:
            opt = tr.strategy.optimizers["generator"]
            next(iter(opt.state.values()))["exp_avg"].fill_(float("nan"))
        return real(x, step)

    tr.task.losses = poison
    with pytest.raises(NonFiniteStateError, match="step 4"):
        tr.fit()
    assert [s for s, _ in list_complete(tr.run_dir)] == [2]
    assert not os.path.exists(os.path.join(tr.run_dir, "done.json"))


def _signal_at_step(monkeypatch, sig, step, times=1):
    from trainer.tasks.tokenizer import TokenizerTask
    real = TokenizerTask.losses

    def signalled(self, x, s):
        if s == step:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return real(self, x, s)

    monkeypatch.setattr(TokenizerTask, "losses", signalled)
    return real


def test_ctrl_c_saves_once_and_a_second_ctrl_c_stops_at_once(micro, monkeypatch, capsys):
    """Case 4: Ctrl-C gave a traceback and lost the steps since the last checkpoint."""
    from trainer.tasks.tokenizer import TokenizerTask
    args = ["train", "rectok/tiny_stage1", *micro, "run.name=ctrlc", "eval.every_epochs=0"]
    before = signal.getsignal(signal.SIGINT)
    real = _signal_at_step(monkeypatch, signal.SIGINT, 3)
    assert main(args) == 0
    result = _printed(capsys)
    assert result["preempted"] and result["signal"] == "SIGINT" and result["step"] == 4
    assert [s for s, _ in list_complete(result["run_dir"])] == [4]
    assert signal.getsignal(signal.SIGINT) is before
    # Two presses: the second interrupts at once; no checkpoint, the run directory released.
    monkeypatch.setattr(TokenizerTask, "losses", real)
    _signal_at_step(monkeypatch, signal.SIGINT, 6, times=2)
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert [s for s, _ in list_complete(result["run_dir"])] == [4]
    assert not os.path.exists(os.path.join(result["run_dir"], LOCK))


def test_two_trainings_in_one_run_directory(micro, capsys):
    """Case 5: the second one pruned the first one's checkpoint and the metrics interleaved. Now the second
    is refused with the holder named, and the first finishes unharmed."""
    args = ["train", "rectok/tiny_stage1", *micro, "run.name=twice", "eval.every_epochs=0", "run.max_steps=4"]
    first = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = os.path.join(micro[0].split("=", 1)[1], "twice", LOCK)
    wait_until(lambda: os.path.exists(lock) or first.poll() is not None, 120, "the first run took the lock")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"pid {first.pid}" in err and "in use by another training" in err
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert not os.path.exists(lock)
    steps = [r["step"] for r in read_metrics(os.path.dirname(lock)) if "total" in r]
    assert steps == list(range(1, 5))


def test_resume_refuses_a_changed_recipe_and_keeps_the_saved_config(micro, capsys):
    """Case 13: another model size failed inside the checkpoint library after config.yaml was overwritten;
    another lr only warned (and the warning fired on any max_steps change)."""
    base = ["train", "rectok/tiny_stage1", *micro, "run.name=changed", "eval.every_epochs=0"]
    assert main(base + ["run.max_steps=2"]) == 0
    capsys.readouterr()
    run = os.path.join(micro[0].split("=", 1)[1], "changed")
    with open(os.path.join(run, "config.yaml")) as f:
        saved = f.read()
    assert main(base + ["run.max_steps=3", "model.latent_channels=16", "optim.base_lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "model.latent_channels: 8 -> 16" in err and "optim.base_lr" in err and "allow-config-change" in err
    assert "max_steps" not in err  # a longer run is not a change of recipe
    with open(os.path.join(run, "config.yaml")) as f:
        assert f.read() == saved
    assert main(base + ["run.max_steps=3", "optim.base_lr=1e-3", "--allow-config-change"]) == 0
    assert _printed(capsys)["step"] == 3
