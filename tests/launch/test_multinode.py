"""Jobs on a real Slurm cluster of two nodes (tests/conftest.py's `slurm`: each node its own network
namespace with its own hostname and address, the ranks' gloo traffic crossing a bridge between them).

`rectok submit --nodes 2` trains as one process does; HSDP replicates across the nodes and shards
within each; the checkpoint signal stops every rank on both nodes at one step, the job requeues itself
and resumes, and a restart by Slurm resumes too, to the weights of an undisturbed run; a node lost
mid-run (every process of its namespace killed) ends or requeues the job, and the restart resumes from
the newest complete checkpoint to the same weights; an array sweep runs variants of two nodes each.
Where namespaces cannot be made the cluster has one node: the tests of jobs, signals and sweeps then
run their two ranks there, and the HSDP and lost-node tests skip with the reason.
"""
import json
import os
import subprocess
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import assert_png, dit_overrides, losses, micro_overrides, tokenizer_overrides, wait_for, wait_until

from trainer.cli import main
from trainer.config.recipes import load_config
from trainer.engine.checkpoint import list_complete, read_meta
from trainer.engine.tracking import read_metrics
from trainer.parallel.consolidate import load_state
from trainer.tasks.training import build_trainer

pytestmark = pytest.mark.slurm

STEPS = 4  # the first-steps comparisons


def job_args(nodes: int, ranks_per_node: int, loader: str = "pil") -> list[str]:
    """A Slurm job of one-CPU tasks (run on CPU: the cluster's nodes have no GPU). PIL spares each rank FFCV's
    numba compilation (~5 s on 2 cores) where the loader is not what is tested."""
    return ["run.device=cpu", f"data.loader={loader}", "slurm.executor=slurm", f"slurm.nodes={nodes}",
            f"slurm.gpus_per_node={ranks_per_node}", "slurm.cpus_per_task=1"]


@contextmanager
def one_thread():
    """Jobs inherit the submitting environment: one torch thread per rank, so runs compared with each
    other compute the same numbers."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS") if before is None else os.environ.update(OMP_NUM_THREADS=before)


def submit_job(cfg):
    from slurm.submit import submit
    with one_thread():
        return submit(cfg, [])


def last_step(run_dir) -> int:
    return max((r["step"] for r in read_metrics(run_dir, missing_ok=True)), default=0)


def job_field(job_id, field: str) -> str:
    """squeue's %-field of a job in any state ('' once it left the queue)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", field], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip()


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


def assert_same_weights(got_checkpoint: str, want_checkpoint: str) -> None:
    got, want = weights(got_checkpoint), weights(want_checkpoint)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def assert_first_steps_equal(run_dir: str, single_dir: str) -> None:
    got, want = losses(run_dir), losses(single_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for g, w in zip(got[:2], want[:2]):  # the same batch, split over ranks or micro-batches
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (k, g[k], w[k])


def task_logs(run_dir: str, job_id) -> str:
    folder = os.path.join(run_dir, "slurm")
    return "".join(open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder))
                   if f.startswith(f"{job_id}_") and f.endswith("_log.err"))


def resumed_from(run_dir: str) -> list[str]:
    with open(os.path.join(run_dir, "train.log")) as f:
        return [line.split("resumed from ")[1].split()[0] for line in f if "resumed from" in line]


def test_submit_across_nodes_trains_as_one_process(slurm, tmp_path, dataset_dir, capsys, monkeypatch):
    """`rectok submit --nodes 2` of the tiny tokenizer under DDP, one rank per node, each reading the .beton
    (FFCV): the first steps' losses equal a single process's on the same global batch, and the job's records
    are written."""
    n = slurm.nodes
    over = [*tokenizer_overrides(tmp_path, dataset_dir), *job_args(n, 2 // n, "ffcv"), f"run.max_steps={STEPS}"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["submit", "rectok/tiny_stage1", *over, "run.name=ddp", "--nodes", str(n), "--gpus-per-node", str(2 // n)]
    t0 = time.monotonic()
    assert main(argv) == 0
    job_id = json.loads(capsys.readouterr().out)["job_id"]
    wait_until(lambda: job_field(job_id, "%T") in ("RUNNING", "COMPLETING", "COMPLETED"), 60, "the job starts")
    print(f"cluster of {n} node(s) started in {slurm.start_s:.1f} s; job {job_id} running "
          f"{time.monotonic() - t0:.1f} s after `rectok submit` began")
    single = build_trainer(load_config("rectok/tiny_stage1", [*over, "run.name=single", "data.micro_batch=4"])).fit()
    run = str(tmp_path / "ddp")
    wait_until(lambda: os.path.exists(os.path.join(run, "done.json")), 180, "the job finishes")
    # done.json is written a moment before the tasks exit and Slurm marks the job COMPLETED
    wait_until(lambda: job_field(job_id, "%T") == "COMPLETED", 60, "Slurm marks the job COMPLETED")
    assert job_field(job_id, "%D") == str(n)
    assert_first_steps_equal(run, single["run_dir"])
    with open(os.path.join(run, "done.json")) as f:
        done = json.load(f)
    assert done["step"] == STEPS and read_meta(done["checkpoint"])["world"] == 2
    with open(os.path.join(run, "submissions.jsonl")) as f:
        record = json.loads(f.readline())
    assert record["executor"] == "slurm" and record["job_id"] == job_id and record["world"] == 2
    script = open(os.path.join(run, "slurm", f"{job_id}_submission.sh")).read()
    assert f"#SBATCH --nodes={n}" in script and "#SBATCH --signal=USR2@120" in script
    assert "gpus" not in script  # a CPU run asks for no GPU
    if n == 2:  # the process group chose the interface each node reaches the master by
        assert "the process group runs over eth0 (198.18." in task_logs(run, job_id)


def test_hsdp_replicates_across_nodes_and_shards_within(slurm, tmp_path, dataset_dir, tokenizer_run):
    """The tiny DiT^DH under HSDP on two nodes x two ranks (replicas across the nodes, shards within each):
    its first steps equal a single process's."""
    slurm.require_nodes(2)
    over = [*dit_overrides(tmp_path, dataset_dir, tokenizer_run), f"run.max_steps={STEPS}"]
    assert main(["cache-latents", "dit/tiny_dit", *over]) == 0
    hsdp = [*over, *job_args(2, 2), "run.name=hsdp", "parallel.strategy=fsdp", "parallel.replicate_degree=2"]
    job = submit_job(load_config("dit/tiny_dit", hsdp, 4))
    single = build_trainer(load_config("dit/tiny_dit", [*over, "run.name=single", "data.micro_batch=4"])).fit()
    results = wait_for(job, 240)
    assert [r["step"] for r in results] == [STEPS] * 4
    run = str(tmp_path / "hsdp")
    assert_first_steps_equal(run, single["run_dir"])
    meta = read_meta(results[0]["checkpoint"])
    assert meta["world"] == 4 and meta["strategy"] == "fsdp"
    log = task_logs(run, job.job_id) + open(os.path.join(run, "train.log")).read()
    assert "HSDP: 2 replicas x 2 shards (replicas across the nodes, shards within each)" in log


@pytest.fixture(scope="module")
def signal_job(tmp_path_factory, dataset_dir, slurm):
    """The job the signal and lost-node tests disturb (20 steps, a checkpoint every 4, two ranks over the
    cluster's nodes), and the same job left alone: submitted once, running beside the first test."""
    n = slurm.nodes
    over = [*micro_overrides(tmp_path_factory.mktemp("signal"), dataset_dir), *job_args(n, 2 // n),
            "checkpoint.every_steps=4", "checkpoint.keep_last=10"]
    return over, submit_job(load_config("rectok/tiny_stage1", [*over, "run.name=straight"]))


def test_checkpoint_signal_requeues_and_a_restart_resumes_to_the_same_weights(slurm, signal_job):
    """USR2 mid-run: every rank on both nodes stops at one step, they save one checkpoint together, the job
    requeues itself and resumes. Then `scontrol requeue` (Slurm's restart, as after a preemption: TERM to
    every task): all save at one step and end without a result or a requeue of their own, and the
    restarted job resumes from that checkpoint, not the older periodic one. The final weights equal those
    of the same job left alone."""
    over, straight = signal_job
    cfg = load_config("rectok/tiny_stage1", [*over, "run.name=interrupted"])
    job = submit_job(cfg)
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
    assert task_logs(run, job.job_id).count("SIGUSR2 received") == 2  # each rank, on its node
    # Requeued and resumed past the next periodic checkpoint: Slurm restarts it.
    periodic = (stopped // 4 + 1) * 4
    wait_until(lambda: last_step(run) > periodic, 120, "the requeued job resumes")
    trained = last_step(run)
    subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True, timeout=30)
    results = wait_for(job, 240)
    assert [r["step"] for r in results] == [20, 20] and not results[0]["preempted"]
    resumed = resumed_from(run)
    assert len(resumed) == 2 and resumed[0].endswith(f"step_{stopped:08d}")
    term_step = int(resumed[1].rsplit("_", 1)[1])
    assert trained <= term_step < 20  # saved on TERM, newer than the periodic checkpoint
    with open(requeues) as f:
        assert len(f.readlines()) == 1  # the restart was Slurm's, not the job's own requeue
    assert_same_weights(results[0]["checkpoint"], wait_for(straight, 120)[0]["checkpoint"])


def test_a_lost_node_ends_or_requeues_the_job_and_the_restart_resumes(slurm, signal_job):
    """Every process of node 2 killed mid-run (slurmd, step daemon, the rank): the job fails or Slurm
    requeues it once the node is declared down; with the node back, the restarted job (or the run
    submitted again) resumes from the newest complete checkpoint, never a half-written one, and ends
    with the weights of the undisturbed run."""
    slurm.require_nodes(2)
    over, straight = signal_job
    reference = wait_for(straight, 240)[0]  # it ran on node 2 too: done before the node goes
    cfg = load_config("rectok/tiny_stage1", [*over, "run.name=lost"])
    job = submit_job(cfg)
    run = cfg.run_dir
    wait_until(lambda: last_step(run) >= 6, 120, "the job trains past its first periodic checkpoint")
    t0, at = time.monotonic(), last_step(run)
    slurm.node("node-down", 2)
    state = wait_until(lambda: (s := job_field(job.job_id, "%T")) not in ("RUNNING", "COMPLETING") and s, 120,
                       "the job ends or is requeued")
    lost_s = time.monotonic() - t0
    complete = [path for _, path in list_complete(run)]
    assert complete, "no complete checkpoint before the node was lost"
    slurm.node("node-up", 2)
    if state not in ("PENDING", "CONFIGURING"):  # ended (failed): submitted again, as a user would
        assert state in ("FAILED", "NODE_FAIL", "CANCELLED"), state
        job = submit_job(cfg)
    wait_until(lambda: last_step(run) >= 20 and os.path.exists(os.path.join(run, "done.json")), 240,
               "the restarted job finishes")
    print(f"lost node: job {state} {lost_s:.1f} s after node 2 went down at step {at}; "
          f"finished {time.monotonic() - t0:.1f} s after")
    assert resumed_from(run) == [complete[-1]]  # the newest complete one, and only that
    with open(os.path.join(run, "done.json")) as f:
        assert_same_weights(json.load(f)["checkpoint"], reference["checkpoint"])


def test_array_sweep_of_two_node_variants_runs_then_resubmitting_reruns_nothing(slurm, tmp_path, job_overrides,
                                                                                capsys, monkeypatch):
    """Two variants of two-node jobs as one array job, overrides typed at submission; status, table and
    plot then read what the submission resolved (sweep.json) from another working directory, without
    the overrides; resubmitting with them submits nothing."""
    n = slurm.nodes
    sweep = tmp_path / "two.yaml"
    sweep.write_text(json.dumps({"base": "rectok/tiny_stage1", "max_running": 2, "overrides": job_overrides,
                                 "variants": [{"model.latent_channels": 4}, {"model.latent_channels": 8}]}))
    typed = [*job_args(n, 1), "run.max_steps=2"]  # on the command line only
    assert main(["sweep", str(sweep), *typed]) == 0
    out = capsys.readouterr().out
    assert "submitted 2 of 2 variants as job" in out
    sweep_dir = tmp_path / "two"
    runs = [sweep_dir / f"latent_channels={c}" for c in (4, 8)]
    wait_until(lambda: all((r / "done.json").exists() for r in runs), 240, "both variants finish")
    subs = [json.loads((r / "submissions.jsonl").read_text()) for r in runs]
    array = subs[0]["job_id"].split("_")[0]
    assert [s["job_id"] for s in subs] == [f"{array}_0", f"{array}_1"] and subs[0]["variant"] == "latent_channels=4"
    for s in subs:
        assert job_field(s["job_id"], "%D") == str(n) and s["world"] == n
    for r, c in zip(runs, (4, 8)):
        assert f"latent_channels: {c}" in (r / "config.yaml").read_text()
    stored = json.loads((sweep_dir / "sweep.json").read_text())
    assert stored["overrides"] == typed and stored["keys"] == ["model.latent_channels"]
    assert stored["executor"] == "slurm" and stored["command"] == f"rectok sweep {sweep} {' '.join(typed)}"
    assert [(v["name"], v["values"], v["run_dir"], v["job_id"], v["action"]) for v in stored["variants"]] == [
        (f"latent_channels={c}", {"model.latent_channels": c}, str(r), s["job_id"], "submit")
        for c, r, s in zip((4, 8), runs, subs)]
    assert [v["config_hash"] for v in stored["variants"]] == [json.loads((r / "done.json").read_text())["config_hash"]
                                                               for r in runs]
    for r in runs:  # evaluation results land in RUN/eval by default, where status, table and plot find them
        assert main(["eval", "probe", str(r), "--epochs", "5", "--num-train", "40"]) == 0
    capsys.readouterr()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no overrides typed from here on, until the resubmission
    for where in (sweep, sweep_dir):
        assert main(["sweep", str(where), "--status"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert len(table) == 4 and table[0].startswith("sweep two: 2 variants, as resolved at submission"), table
        assert table[1].split()[:6] == ["variant", "state", "step", "psnr", "probe_clean", "probe_xt"], table
        assert all(row.split()[1:3] == ["finished", "2"] for row in table[2:]), table
        assert table[2].endswith(str(runs[0])) and "-" not in table[2].split()[3:6], table
    assert main(["sweep", str(sweep), "--table"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["csv"] == str(sweep_dir / "results.csv") and written["markdown"] == str(sweep_dir / "results.md")
    rows = (sweep_dir / "results.csv").read_text().splitlines()
    assert rows[0] == "model.latent_channels,variant,psnr,probe_clean,probe_xt,state,step,run_dir", rows
    assert [row.split(",")[0] for row in rows[1:]] == ["4", "8"] and all(",finished,2," in row for row in rows[1:])
    assert "| model.latent_channels | PSNR (dB) |" in (sweep_dir / "results.md").read_text()
    assert main(["sweep", str(sweep), "--plot"]) == 0
    plot = json.loads(capsys.readouterr().out)
    assert plot["x"] == "model.latent_channels" and plot["values"] == [4, 8]
    assert all("top1_clean" in r and "eval/psnr_ema" in r for r in plot["results"].values()), plot["results"]
    assert_png(plot["metrics_against"])
    assert_png(plot["metrics_curves"])
    assert os.listdir(".") == []
    assert main(["sweep", str(sweep), *typed]) == 0
    assert "submitted 0 of 2 variants" in capsys.readouterr().out
    again = json.loads((sweep_dir / "sweep.json").read_text())
    assert [v["action"] for v in again["variants"]] == ["skip", "skip"] and again["submitted"] >= stored["submitted"]
    for r in runs:
        assert len((r / "submissions.jsonl").read_text().splitlines()) == 1
    queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True, timeout=30)
    assert max(int(i.split("_")[0]) for i in queue.stdout.split()) == int(array)  # no job since the sweep's
