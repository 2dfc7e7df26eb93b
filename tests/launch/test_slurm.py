"""A real one-node Slurm cluster (Debian's slurm-wlm and munge, started by scripts/slurm_cluster.sh):
`rectok submit` jobs, the checkpoint signal with requeue and resume, a restart from the original
submission, and a 2-variant array sweep resubmitted. Skipped only where Slurm is not installed or
slurmd cannot run (not root); scripts/setup.sh installs it as root, so CI runs these.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import assert_png, wait_for, wait_until

from trainer.cli import main
from trainer.config.catalog import REPO_ROOT
from trainer.config.recipes import load_config
from trainer.engine.checkpoint import read_meta
from trainer.engine.tracking import read_metrics
from trainer.parallel.consolidate import load_state

pytestmark = pytest.mark.slurm

CLUSTER = os.path.join(REPO_ROOT, "scripts", "slurm_cluster.sh")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    daemons = [shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin") for d in ("slurmctld", "slurmd")]
    if shutil.which("sbatch") is None or None in daemons:
        pytest.skip("Slurm is not installed (scripts/setup.sh installs slurm-wlm and munge when run as root)")
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm cluster needs root (slurmd starts the jobs)")
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", CLUSTER, "start", str(folder)], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    yield folder
    subprocess.run(["scancel", "--user=root"], capture_output=True, timeout=30)

    def queue_empty():
        out = subprocess.run(["squeue", "-h", "-t", "pending,running,completing"], capture_output=True, text=True,
                             timeout=30)
        return out.returncode == 0 and not out.stdout.strip()
    wait_until(queue_empty, 60, "the cluster's jobs end")  # so their step daemons can report and exit
    subprocess.run(["bash", CLUSTER, "stop", str(folder)], capture_output=True, timeout=60)
    if before is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture
def job_overrides(micro, monkeypatch):
    """The micro recipe as a Slurm job of one-CPU tasks, one torch thread each (jobs compared with each
    other compute the same numbers)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return [*micro, "run.device=cpu", "data.loader=pil", "slurm.executor=slurm", "slurm.nodes=1",
            "slurm.gpus_per_node=1", "slurm.cpus_per_task=1"]


def last_step(run_dir) -> int:
    return max((r["step"] for r in read_metrics(run_dir, missing_ok=True)), default=0)


def weights(checkpoint: str) -> dict:
    state = load_state(checkpoint)
    return {f"{part}.{k}": v for part in ("modules", "ema") for k, v in _flat(state[part]).items()}


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


def test_submit_on_slurm_returns_the_result(slurm, tmp_path, job_overrides):
    from slurm.submit import submit
    cfg = load_config("rectok/tiny_stage1", [*job_overrides, "run.max_steps=2"])
    job = submit(cfg, ["submit", "rectok/tiny_stage1"])
    (result,) = wait_for(job, 180)
    assert result["step"] == 2 and not result["preempted"] and os.path.isdir(result["checkpoint"])
    with open(os.path.join(cfg.run_dir, "submissions.jsonl")) as f:
        record = json.loads(f.readline())
    assert record["executor"] == "slurm" and record["job_id"] == str(job.job_id) and record["job_id"].isdigit()
    script = open(os.path.join(cfg.run_dir, "slurm", f"{job.job_id}_submission.sh")).read()
    assert "#SBATCH --signal=USR2@120" in script and "gpus" not in script  # a CPU run asks for no GPU
    with open(os.path.join(cfg.run_dir, "done.json")) as f:
        assert json.load(f)["step"] == 2


def test_checkpoint_signal_requeues_and_a_restart_resumes_to_the_same_weights(slurm, tmp_path, job_overrides):
    """Two ranks. USR2 mid-run: both stop at one step, save one checkpoint together, the job requeues
    itself and resumes. Then `scontrol requeue` (Slurm's restart, as after a preemption: TERM to every
    task): both save at one step and end without a result or a requeue of their own, and the restarted
    job resumes from that checkpoint, not the older periodic one. The final weights equal those of the
    same job left alone, which runs beside it."""
    from slurm.submit import submit
    over = [*job_overrides, "slurm.gpus_per_node=2", "checkpoint.every_steps=4", "checkpoint.keep_last=10"]
    straight = submit(load_config("rectok/tiny_stage1", [*over, "run.name=straight"]), [])
    cfg = load_config("rectok/tiny_stage1", [*over, "run.name=interrupted"])  # 20 steps
    job = submit(cfg, [])
    run = cfg.run_dir
    wait_until(lambda: last_step(run) >= 2, 120, "the job trains")
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True, timeout=30)
    requeues = os.path.join(run, "requeues.jsonl")
    wait_until(lambda: os.path.exists(requeues), 60, "the job checkpoints and requeues")
    with open(requeues) as f:
        (record,) = [json.loads(line) for line in f]
    stopped = record["step"]
    assert record["signal"] == "SIGUSR2" and record["job_id"] == str(job.job_id) and 2 <= stopped < 16
    assert read_meta(os.path.join(run, "checkpoints", f"step_{stopped:08d}"))["world"] == 2
    # Requeued and resumed past the next periodic checkpoint: Slurm restarts it.
    periodic = (stopped // 4 + 1) * 4
    wait_until(lambda: last_step(run) > periodic, 120, "the requeued job resumes")
    trained = last_step(run)
    subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True, timeout=30)
    results = wait_for(job, 240)
    assert [r["step"] for r in results] == [20, 20] and not results[0]["preempted"]
    with open(os.path.join(run, "train.log")) as f:
        resumed = [line.split("resumed from ")[1].split()[0] for line in f if "resumed from" in line]
    assert len(resumed) == 2 and resumed[0].endswith(f"step_{stopped:08d}")
    term_step = int(resumed[1].rsplit("_", 1)[1])
    assert trained <= term_step < 20  # saved on TERM, newer than the periodic checkpoint
    with open(requeues) as f:
        assert len(f.readlines()) == 1  # the restart was Slurm's, not the job's own requeue
    reference = wait_for(straight, 120)[0]
    got, want = weights(results[0]["checkpoint"]), weights(reference["checkpoint"])
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_array_sweep_runs_then_resubmitting_reruns_nothing(slurm, tmp_path, job_overrides, capsys):
    sweep = tmp_path / "two.yaml"
    sweep.write_text(json.dumps({"base": "rectok/tiny_stage1", "max_running": 2,
                                 "overrides": [*job_overrides, "run.max_steps=2"],
                                 "variants": [{"model.latent_channels": 4}, {"model.latent_channels": 8}]}))
    assert main(["sweep", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "submitted 2 of 2 variants as job" in out
    runs = [tmp_path / "two" / f"latent_channels={c}" for c in (4, 8)]
    wait_until(lambda: all((r / "done.json").exists() for r in runs), 240, "both variants finish")
    subs = [json.loads((r / "submissions.jsonl").read_text()) for r in runs]
    array = subs[0]["job_id"].split("_")[0]
    assert [s["job_id"] for s in subs] == [f"{array}_0", f"{array}_1"] and subs[0]["variant"] == "latent_channels=4"
    for r, c in zip(runs, (4, 8)):
        assert f"latent_channels: {c}" in (r / "config.yaml").read_text()
    assert main(["sweep", str(sweep), "--status"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and all(" finished " in row and " 2 " in row for row in table[2:]), table
    assert str(runs[0]) in table[2] and "eval/psnr_ema=" in table[2]
    for r in runs:  # evaluation results land in RUN/eval by default, where the sweep's plot finds them
        assert main(["eval", "probe", str(r), "--epochs", "5", "--num-train", "40"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(sweep), "--plot"]) == 0
    plot = json.loads(capsys.readouterr().out)
    assert plot["x"] == "model.latent_channels" and plot["values"] == [4, 8]
    assert all("top1_clean" in r and "eval/psnr_ema" in r for r in plot["results"].values()), plot["results"]
    assert_png(plot["metrics_against"])
    assert_png(plot["metrics_curves"])
    assert main(["sweep", str(sweep)]) == 0
    assert "submitted 0 of 2 variants" in capsys.readouterr().out
    for r in runs:
        assert len((r / "submissions.jsonl").read_text().splitlines()) == 1
    queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True, timeout=30)
    assert max(int(i.split("_")[0]) for i in queue.stdout.split()) == int(array)  # no job since the sweep's
