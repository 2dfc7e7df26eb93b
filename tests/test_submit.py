"""`rectok submit` through submitit's local executor (this machine has no Slurm): real job processes,
ranks from submitit's job environment, the run's records, and clear errors for Slurm-only options.
"""
import json
import os
import shutil
import time

import pytest

from trainer.checkpoint import read_meta
from trainer.cli import main
from trainer.config import ConfigError, dump_config, load_config

pytestmark = pytest.mark.skipif(shutil.which("sbatch") is not None, reason="these cover machines without Slurm")


def wait_for(job, timeout_s: float = 240):
    """job.results() with a deadline: a job that dies without a result would otherwise hang the suite."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        assert time.monotonic() < deadline, f"job {job.job_id} still running after {timeout_s} s"
        time.sleep(0.5)
    return job.results()


def tiny(tmp_path, dataset_dir, name, *extra):
    return [f"run.output_dir={tmp_path}", f"run.name={name}", "model.image_size=32", "model.patch_size=8",
            "model.latent_channels=8", "teacher.name=dinov3-micro", f"data.default_dataset_dir={dataset_dir}",
            "data.default_per_class=16", "data.global_batch=8", "data.num_workers=0", "loss.convnext_size=32",
            "logging.progress=false", "eval.num_images=8", "eval.grid_images=2", "checkpoint.every_steps=0",
            "run.max_steps=2", *extra]


def test_local_job_trains_and_records_the_submission(tmp_path, dataset_dir):
    from slurm.submit import submit
    over = tiny(tmp_path, dataset_dir, "one")
    cfg = load_config("rectok/tiny_stage1", over)
    job = submit(cfg, ["submit", "rectok/tiny_stage1", *over])
    (result,) = wait_for(job)
    assert result["step"] == 2 and os.path.isdir(result["checkpoint"])
    with open(tmp_path / "one" / "submissions.jsonl") as f:
        record = json.loads(f.readline())
    assert record["executor"] == "local" and record["job_id"] == str(job.job_id) and record["world"] == 1
    assert record["command"].startswith("rectok submit rectok/tiny_stage1 run.output_dir=")
    assert record["git_commit"] is None or len(record["git_commit"].split("-")[0]) == 40
    with open(tmp_path / "one" / "config.yaml") as f:
        assert f.read() == dump_config(cfg)


def test_two_local_ranks_from_the_job_environment(tmp_path, dataset_dir):
    """gpus_per_node=2 on the local executor: two processes whose rank and world come from submitit."""
    from slurm.submit import submit
    cfg = load_config("rectok/tiny_stage1", tiny(tmp_path, dataset_dir, "two", "data.loader=pil",
                                                 "slurm.gpus_per_node=2"))
    results = wait_for(submit(cfg, []))
    assert [r["step"] for r in results] == [2, 2]
    assert read_meta(results[0]["checkpoint"])["world"] == 2


@pytest.mark.parametrize("flags,key", [(["--partition", "gpu"], "slurm.partition"),
                                       (["--sbatch", "exclusive=user"], "slurm.extra_sbatch"),
                                       (["--sbatch", "mail-type=END,FAIL"], "slurm.extra_sbatch"),
                                       (["--nodes", "2"], "slurm.nodes"),
                                       (["slurm.executor=slurm"], "slurm.executor")])
def test_slurm_options_without_slurm_are_clear_and_submit_nothing(tmp_path, dataset_dir, capsys, flags, key):
    assert main(["submit", "rectok/tiny_stage1", *tiny(tmp_path, dataset_dir, "none"), *flags]) == 2
    err = capsys.readouterr().err
    assert key in err and "sbatch is not on PATH" in err
    assert not os.path.exists(tmp_path / "none")


def test_world_must_divide_the_batch(tmp_path, dataset_dir):
    from slurm.submit import submit
    cfg = load_config("rectok/tiny_stage1", tiny(tmp_path, dataset_dir, "odd", "slurm.gpus_per_node=3"))
    with pytest.raises(ConfigError, match=r"data\.global_batch: 8 is not divisible by the world size 3 "
                                          r"\(the job's ranks: slurm\.nodes x slurm\.gpus_per_node = 3\)"):
        submit(cfg, [])
