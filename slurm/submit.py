"""`rectok submit`: one training run as a submitit job, on Slurm or as local processes.

The resolved config travels with the job as YAML, so a requeued or restarted job trains exactly
what was submitted. Each task learns its rank, the world size and the master address from
submitit's job environment; the trainer then joins the process group as under torchrun. The run
directory gets `config.yaml`, and a line in `submissions.jsonl` with the command line, the git
commit and the job id per submission; submitit's own files (the pickled job,
`<job>_<task>_log.out/err`) go to `RUN/slurm/`.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import subprocess

from trainer.config import ConfigError, TrainConfig, dump_config, parse_saved_config, validate

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
        import submitit

        from trainer.distributed import env_from_launcher
        from trainer.loop import Trainer
        # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the job; the trainer picks GPU LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        env = env_from_launcher()
        try:
            return Trainer(parse_saved_config(self.config_yaml), env).fit()
        finally:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def build_executor(cfg: TrainConfig, kind: str):
    import submitit
    sl = cfg.slurm
    folder = os.path.join(cfg.run_dir, "slurm")
    params = dict(nodes=sl.nodes, tasks_per_node=sl.gpus_per_node, cpus_per_task=sl.cpus_per_task,
                  timeout_min=sl.time_min, name=sl.job_name or f"rectok-{cfg.run.name}")
    if kind == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params.update(gpus_per_node=sl.gpus_per_node, slurm_signal_delay_s=120,
                      slurm_additional_parameters=dict(line.split("=", 1) for line in sl.extra_sbatch))
        params.update({f"slurm_{k}": getattr(sl, k) for k in ("partition", "account", "qos", "constraint")
                       if getattr(sl, k)})
        if sl.mem_gb:
            params["mem_gb"] = sl.mem_gb
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
    executor.update_parameters(**params)
    return executor


def submit(cfg: TrainConfig, argv: list[str]):
    """Submit `cfg` as one job; returns the submitit job. Nothing is submitted if the options are wrong."""
    kind = resolve_executor(cfg)
    world = cfg.slurm.nodes * cfg.slurm.gpus_per_node
    try:  # the trainer's own checks for the job's world size (batch and micro-batch splits)
        validate(cfg, world)
    except ConfigError as e:
        raise ConfigError(f"{e} (the job's ranks: slurm.nodes x slurm.gpus_per_node = {world})") from None
    os.makedirs(cfg.run_dir, exist_ok=True)
    text = dump_config(cfg)
    with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
        f.write(text)
    job = build_executor(cfg, kind).submit(TrainJob(text))
    record = {"command": shlex.join(["rectok", *argv]), "git_commit": git_commit(),
              "executor": kind, "job_id": str(job.job_id), "world": world,
              "submitted": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with open(os.path.join(cfg.run_dir, "submissions.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    return job
