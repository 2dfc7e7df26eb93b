"""`rectok submit` through submitit's local executor (real job processes, ranks from submitit's job
environment, the run's records) and the clear errors for Slurm-only options on a machine without
Slurm. Where Slurm is installed, `slurm.executor=local` picks the local executor, and "no Slurm" is
`sbatch` missing from the executor's view of PATH (tests/launch/test_multinode.py covers the real cluster).
"""
import json
import os

import pytest
from conftest import wait_for, wait_until

from trainer.cli import main
from trainer.config.recipes import dump_config, load_config
from trainer.config.tree import ConfigError
from trainer.engine.checkpoint import read_meta
from trainer.engine.tracking import read_metrics


@pytest.fixture
def no_slurm(monkeypatch):
    import slurm.submit
    monkeypatch.setattr(slurm.submit.shutil, "which", lambda name, *a, **k: None)


def tiny(tmp_path, dataset_dir, name, *extra):
    return [f"run.output_dir={tmp_path}", f"run.name={name}", "model.image_size=32", "model.patch_size=8",
            "model.latent_channels=8", "teacher.name=dinov3-micro", f"data.default_dataset_dir={dataset_dir}",
            "data.default_per_class=16", "data.global_batch=8", "data.num_workers=0", "loss.convnext_size=32",
            "logging.progress=false", "eval.num_images=8", "eval.grid_images=2", "checkpoint.every_steps=0",
            "run.max_steps=2", "slurm.executor=local", *extra]


@pytest.mark.distributed
def test_two_local_ranks_train_and_the_submission_is_recorded(tmp_path, dataset_dir):
    """gpus_per_node=2 on the local executor: two processes whose rank and world come from submitit."""
    from slurm.submit import submit
    over = tiny(tmp_path, dataset_dir, "two", "data.loader=pil", "slurm.gpus_per_node=2")
    cfg = load_config("rectok/tiny_stage1", over)
    job = submit(cfg, ["submit", "rectok/tiny_stage1", *over])
    results = wait_for(job)
    assert [r["step"] for r in results] == [2, 2] and not results[0]["preempted"]
    assert read_meta(results[0]["checkpoint"])["world"] == 2
    with open(tmp_path / "two" / "submissions.jsonl") as f:
        record = json.loads(f.readline())
    assert record["executor"] == "local" and record["job_id"] == str(job.job_id) and record["world"] == 2
    assert record["command"].startswith("rectok submit rectok/tiny_stage1 run.output_dir=")
    assert record["git_commit"] is None or len(record["git_commit"].split("-")[0]) == 40
    with open(tmp_path / "two" / "config.yaml") as f:
        assert f.read() == dump_config(cfg)


@pytest.mark.parametrize("flags,key", [(["--partition", "gpu"], "slurm.partition"),
                                       (["--sbatch", "exclusive=user"], "slurm.extra_sbatch"),
                                       (["--sbatch", "mail-type=END,FAIL"], "slurm.extra_sbatch"),
                                       (["--nodes", "2"], "slurm.nodes"),
                                       (["slurm.executor=slurm"], "slurm.executor")])
@pytest.mark.quick
def test_slurm_options_without_slurm_are_clear_and_submit_nothing(tmp_path, dataset_dir, capsys, no_slurm, flags,
                                                                  key):
    over = [o for o in tiny(tmp_path, dataset_dir, "none") if o != "slurm.executor=local"]  # auto
    assert main(["submit", "rectok/tiny_stage1", *over, *flags]) == 2
    err = capsys.readouterr().err
    assert key in err and "sbatch is not on PATH" in err
    assert not os.path.exists(tmp_path / "none")


@pytest.mark.quick
def test_world_must_divide_the_batch(tmp_path, dataset_dir):
    from slurm.submit import submit
    cfg = load_config("rectok/tiny_stage1", tiny(tmp_path, dataset_dir, "odd", "slurm.gpus_per_node=3"))
    with pytest.raises(ConfigError, match=r"data\.global_batch: 8 is not divisible by the world size 3 "
                                          r"\(the job's ranks: slurm\.nodes x slurm\.gpus_per_node = 3\)"):
        submit(cfg, [])


def write_sweep(path, spec: dict) -> str:
    path.write_text(json.dumps(spec))  # JSON is YAML
    return str(path)


@pytest.mark.quick
def test_bundled_sweeps_are_the_paper_recipes(tmp_path):
    """latent_dims: C = 16, 32, 64, 128 with the teacher switch (DINOv2-L/14 for C <= 32), each variant the
    same config as its configs/rectok/stage1_d{C}.yaml; dit_sizes: S, B, L, XL at 80 epochs."""
    from slurm.sweep import load_sweep
    from trainer.config.tree import to_dict
    spec, variants = load_sweep("sweeps/latent_dims", [f"run.output_dir={tmp_path}"], check=False)
    assert [v.name for v in variants] == [f"latent_channels={c}" for c in (16, 32, 64, 128)]
    for v, c in zip(variants, (16, 32, 64, 128)):
        recipe = to_dict(load_config(f"rectok/stage1_d{c}", [f"run.output_dir={tmp_path}"]))
        got = to_dict(v.cfg)
        assert got["run"].pop("name") == f"latent_dims/latent_channels={c}"
        recipe["run"].pop("name")
        assert got == recipe, c
        assert v.cfg.run_dir == os.path.join(str(tmp_path), "latent_dims", f"latent_channels={c}")
    assert [v.cfg.teacher.name for v in variants] == ["dinov2-l14", "dinov2-l14", "dinov3-l16", "dinov3-l16"]
    assert spec.max_running == 4 and len({v.config_hash for v in variants}) == 4
    _, sizes = load_sweep("sweeps/dit_sizes", check=False)
    assert [(v.name, v.cfg.model.name, v.cfg.schedule.epochs) for v in sizes] == [
        (f"name=DiTDH-{s}", f"DiTDH-{s}", 80) for s in ("S", "B", "L", "XL")]


@pytest.mark.quick
def test_sweep_dry_run_submits_nothing_and_bad_variants_are_named(tmp_path, dataset_dir, capsys):
    over = tiny(tmp_path, dataset_dir, "x")
    good = {"base": "rectok/tiny_stage1", "overrides": over,
            "variants": [{"model.latent_channels": 4}, {"model.latent_channels": 8, "optim.base_lr": 2e-4}]}
    assert main(["sweep", write_sweep(tmp_path / "s.yaml", good), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would submit 2 of 2 variants" in out and "latent_channels=8,base_lr=0.0002" in out
    assert os.listdir(tmp_path) == ["s.yaml"]  # nothing written
    assert main(["sweep", str(tmp_path / "s.yaml"), "--status"]) == 0
    assert capsys.readouterr().out.count("not submitted") == 2
    cases = [({"model.latent_chanels": 4}, "variant latent_chanels=4: unknown config key model.latent_chanels"),
             ({"slurm.gpus_per_node": 2}, "variant gpus_per_node=2: slurm.gpus_per_node differs from variant "
                                          "latent_channels=4's; one array job"),
             ({"model.latent_channels": 4, "optim.base_lr": 1}, None)]
    for extra, message in cases:
        bad = dict(good, variants=[{"model.latent_channels": 4}, extra])
        if message is None:  # names differ only by a key outside name_keys
            bad["name_keys"] = ["model.latent_channels"]
            message = "two variants share a folder name"
        assert main(["sweep", write_sweep(tmp_path / "bad.yaml", bad), "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    missing = dict(good, variants=[{"teacher.weights": "nowhere.pth", "teacher.name": "dinov3-micro"}])
    assert main(["sweep", write_sweep(tmp_path / "m.yaml", missing), "--dry-run"]) == 2
    assert "variant weights=nowhere" in capsys.readouterr().err


def _tasks_of(controller_pid: int) -> list[int]:
    """The local executor's task processes: the children of its controller."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == controller_pid:
                    pids.append(int(entry))
        except (ValueError, OSError, IndexError):
            continue
    return pids


def _steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir, missing_ok=True)]


@pytest.mark.distributed
def test_local_checkpoint_signal_requeues_up_to_the_bound(micro, monkeypatch):
    """The local executor: USR2 to the task -> checkpoint and requeue (its controller starts the task
    again, which resumes); a second USR2 with slurm.max_requeues=1 -> checkpoint and a clear error."""
    import signal

    from slurm.submit import submit
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config("rectok/tiny_stage1", [*micro, "data.loader=pil", "run.device=cpu", "slurm.executor=local",
                                             "slurm.nodes=1", "slurm.gpus_per_node=1", "slurm.max_requeues=1",
                                             "schedule.epochs=2"])
    job = submit(cfg, [])
    run = cfg.run_dir
    wait_until(lambda: len(_steps(run)) >= 2, 120, "the job trains")
    (task,) = _tasks_of(int(job.job_id))
    os.kill(task, signal.SIGUSR2)
    wait_until(lambda: os.path.exists(os.path.join(run, "requeues.jsonl")), 60, "checkpoint and requeue")
    with open(os.path.join(run, "requeues.jsonl")) as f:
        first = json.loads(f.readline())["step"]
    wait_until(lambda: _steps(run)[-1] > first + 1 and _tasks_of(int(job.job_id)), 120, "the requeued task resumes")
    (task,) = _tasks_of(int(job.job_id))
    os.kill(task, signal.SIGUSR2)
    wait_until(job.done, 120, "the job ends")
    with pytest.raises(Exception, match=r"requeued 1 times \(slurm\.max_requeues\); it stopped at step (\d+)"):
        job.result()
    steps = sorted(int(name.split("_")[1]) for name in os.listdir(os.path.join(run, "checkpoints")))
    assert steps[0] == first and first < steps[-1] < 40 and not os.path.exists(os.path.join(run, "done.json"))


def test_evaluation_as_a_job_with_the_resources_of_training(tokenizer_run, tmp_path, capsys):
    """`rectok eval probe RUN --submit`: the evaluation as a submitit job (here the local executor), its
    result where the command writes it, the submission recorded beside it; job flags without --submit are
    refused before anything runs."""
    out = tmp_path / "probe"
    argv = ["eval", "probe", tokenizer_run, "slurm.executor=local", "slurm.gpus_per_node=1", "--epochs", "3",
            "--num-train", "40", "--num-val", "20", "--out", str(out), "--submit", "--wait"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    submitted = json.loads(printed[:printed.index("}") + 1])
    assert submitted["workflow"] == "eval-probe" and submitted["logs"] == str(out / "slurm")
    result = json.loads((out / "eval_probe.json").read_text())
    assert result["train_images"] == 40 and result["val_images"] == 20 and f'"top1_clean": {result["top1_clean"]}' \
        in printed
    record = json.loads((out / "submissions.jsonl").read_text())
    assert record["job_id"] == submitted["job_id"] and record["workflow"] == "eval-probe" and record["world"] == 1
    assert main(["eval", "probe", tokenizer_run, "--nodes", "2"]) != 0
    assert "--nodes is an option of a job: add --submit" in capsys.readouterr().err
