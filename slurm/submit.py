"""`rectok submit`: one training run as a submitit job, on Slurm or as local processes.

The resolved config travels with the job as YAML, so a requeued or restarted job trains exactly
what was submitted. Each task learns its rank, the world size and the master address from
submitit's job environment; the trainer then joins the process group as under torchrun. The run
directory gets `config.yaml`, and a line in `submissions.jsonl` with the command line, the git
commit and the job id per submission; submitit's own files (the pickled job,
`<job>_<task>_log.out/err`) go to `RUN/slurm/`.

Time limits and preemption: Slurm sends USR2 `slurm.signal_delay_s` before the limit (or on
`scancel --signal=USR2`); every rank stops at the same step boundary after one complete checkpoint
(trainer/engine/preemption.py), then rank 0 requeues the job and the requeued job resumes from that
checkpoint, up to `slurm.max_requeues` times per job (`RUN/requeues.jsonl` counts them). A job
restarted from its original submission (`scontrol requeue`, a node failure) resumes from the newest
complete checkpoint the same way, because every start does.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time

import submitit
from submitit.core.utils import UncompletedJobError

from data.files import write_text
from trainer.config.recipes import dump_config, parse_saved_config
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError
from trainer.config.validation import validate
from trainer.engine.distributed import env_from_launcher
from trainer.engine.preemption import StopRequest
from trainer.engine.tracking import configure_logging
from trainer.tasks.training import run_training

log = logging.getLogger("rectok")

SUBMISSIONS = "submissions.jsonl"  # one line per submission of a run: command, commit, executor, job id
SLURM_ONLY = ("partition", "account", "qos", "constraint", "extra_sbatch")


def resolve_executor(cfg: TrainConfig) -> str:
    """slurm.executor with `auto` decided: Slurm when sbatch is on PATH."""
    kind = cfg.slurm.executor
    has_slurm = shutil.which("sbatch") is not None
    if kind == "auto":
        kind = "slurm" if has_slurm else "local"
    if kind == "slurm" and not has_slurm:
        raise ConfigError("slurm.executor: slurm, but sbatch is not on PATH (no Slurm client on this machine)")
    if kind == "local":
        given = [k for k in SLURM_ONLY if getattr(cfg.slurm, k)] + (["nodes"] if cfg.slurm.nodes > 1 else [])
        if given:
            raise ConfigError(f"slurm.{given[0]}: a Slurm option, but this job runs as local processes "
                              f"({'sbatch is not on PATH' if not has_slurm else 'slurm.executor=local'}); "
                              f"unset {', '.join('slurm.' + k for k in given)} or submit where Slurm is")
    return kind


def git_commit() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


class TrainJob:
    """What every task of the job runs: the config (as YAML) trained with this task's rank."""

    def __init__(self, config_yaml: str):
        self.config_yaml = config_yaml

    def __call__(self) -> dict:
        # Replaces submitit's handlers (USR2: a save on rank 0 alone; TERM: ignored) until the job exits.
        stop = StopRequest().install()
        # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the job; the trainer picks GPU LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        env = env_from_launcher()
        configure_logging(env.main)
        cfg = parse_saved_config(self.config_yaml)
        result, _ = run_training(cfg, env, stop)
        if result["preempted"]:
            # No task returns a result, as submitit's own handler does: the job's result is that of the run
            # that finishes, requeued by the job (USR2) or by Slurm (a preemption, `scontrol requeue`);
            # after `scancel` submitit reports the job unfinished.
            if env.main and stop.requeue:
                self._requeue(cfg, result, stop.signal)
            elif env.main:
                log.warning("%s: stopped at step %d with checkpoint %s, not requeued by the job (Slurm requeues "
                            "a preempted job; after a cancel, submit the run again to go on)",
                            stop.signal, result["step"], result["checkpoint"])
            sys.exit(-1)
        return result

    @staticmethod
    def _requeue(cfg: TrainConfig, result: dict, signal_name: str | None) -> None:
        """On rank 0 after the checkpoint: requeue the job, or give up past the bound."""
        job_env = submitit.JobEnvironment()
        path = os.path.join(cfg.run_dir, "requeues.jsonl")
        try:
            with open(path) as f:
                done = sum(json.loads(line)["job_id"] == job_env.job_id for line in f if line.strip())
        except FileNotFoundError:
            done = 0
        if done >= cfg.slurm.max_requeues:
            raise UncompletedJobError(f"job {job_env.job_id} was requeued {done} times (slurm.max_requeues); it "
                                      f"stopped at step {result['step']} with checkpoint {result['checkpoint']}. "
                                      f"Submit the run again to go on from there.")
        with open(path, "a") as f:
            f.write(json.dumps({"job_id": job_env.job_id, "step": result["step"], "checkpoint": result["checkpoint"],
                                "signal": signal_name, "time": time.time()}) + "\n")
        # submitit's own requeue (private, pinned version): `scontrol requeue` on Slurm; on the local
        # executor an exit code that makes its controller start the tasks again.
        job_env._requeue(cfg.slurm.max_requeues - done - 1)


def build_executor(cfg: TrainConfig, kind: str, folder: str | None = None, array_parallelism: int = 0,
                   after: str | None = None):
    """The submitit executor for `cfg`'s resources; `folder` holds submitit's files (default RUN/slurm).
    `array_parallelism` caps the tasks of an array job running at once (0: no cap); `after`: a Slurm
    dependency (e.g. aftercorr:JOB), whose jobs are cancelled when it can no longer be met."""
    sl = cfg.slurm
    folder = folder or os.path.join(cfg.run_dir, "slurm")
    params = dict(nodes=sl.nodes, tasks_per_node=sl.gpus_per_node, cpus_per_task=sl.cpus_per_task,
                  timeout_min=sl.time_min, name=sl.job_name or f"rectok-{cfg.run.name}")
    if kind == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params.update(slurm_signal_delay_s=sl.signal_delay_s,
                      slurm_additional_parameters={**dict(line.split("=", 1) for line in sl.extra_sbatch),
                                                   **({"dependency": after, "kill_on_invalid_dep": "yes"}
                                                      if after else {})})
        if cfg.run.device != "cpu":  # one rank per GPU; a CPU run (tests, CPU clusters) asks for none
            params["gpus_per_node"] = sl.gpus_per_node
        if array_parallelism:
            params["slurm_array_parallelism"] = array_parallelism
        params.update({f"slurm_{k}": getattr(sl, k) for k in ("partition", "account", "qos", "constraint")
                       if getattr(sl, k)})
        if sl.mem_gb:
            params["mem_gb"] = sl.mem_gb
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
    executor.update_parameters(**params)
    return executor


def job_world(cfg: TrainConfig) -> int:
    """The job's ranks, checked with the trainer's own rules (batch and micro-batch splits)."""
    world = cfg.slurm.nodes * cfg.slurm.gpus_per_node
    try:
        validate(cfg, world)
    except ConfigError as e:
        raise ConfigError(f"{e} (the job's ranks: slurm.nodes x slurm.gpus_per_node = {world})") from None
    return world


def write_config(cfg: TrainConfig) -> str:
    """The resolved config into the run directory; returns its text (what the job trains)."""
    text = dump_config(cfg)
    write_text(os.path.join(cfg.run_dir, "config.yaml"), text)
    return text


def record_submission(run_dir: str, world: int, argv: list[str], kind: str, job_id: str, **extra) -> None:
    """A line in RUN/submissions.jsonl: command line, commit, executor, job id, ranks, time."""
    record = {"command": shlex.join(["rectok", *argv]), "git_commit": git_commit(), "executor": kind,
              "job_id": job_id, "world": world,
              "submitted": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **extra}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, SUBMISSIONS), "a") as f:
        f.write(json.dumps(record) + "\n")


def submit(cfg: TrainConfig, argv: list[str]):
    """Submit `cfg` as one job; returns the submitit job. Nothing is submitted if the options are wrong."""
    kind = resolve_executor(cfg)
    world = job_world(cfg)
    job = build_executor(cfg, kind).submit(TrainJob(write_config(cfg)))
    record_submission(cfg.run_dir, world, argv, kind, str(job.job_id))
    return job
