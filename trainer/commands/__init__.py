"""One module per `rectok` command: `register(subparsers)` adds its parser, `run(args)` carries it out.

Command modules import only the standard library at module level; the project and torch are imported
when a command runs, so `rectok --help` stays fast. What a command does lives below
(trainer/workflows, trainer/tasks, slurm); these modules parse, call and print.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable


def print_json(obj) -> int:
    print(json.dumps(obj, indent=2))
    return 0


def run_and_print_on_rank0(run: Callable[[], dict]) -> int:
    """Run a (possibly torchrun-launched) evaluation, leave the process group, and print the result on
    rank 0."""
    import torch.distributed as dist
    try:
        out = run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print_json(out)
    return 0


def add_recipe_arguments(p, what: str = "dotted overrides such as optim.base_lr=2e-4") -> None:
    """CONFIG and key=value overrides, as every recipe-reading command takes them."""
    p.add_argument("config", help="YAML recipe path or bundled name (e.g. rectok/tiny_stage1; `rectok recipes` "
                                  "lists them)")
    p.add_argument("overrides", nargs="*", help=what)


# Job flags and the config keys they set (the config tree stays the one source): `rectok submit`, and the
# commands that run as a job with --submit.
SUBMIT_FLAGS = {"nodes": int, "gpus_per_node": int, "cpus_per_task": int, "partition": str, "account": str,
                "qos": str, "constraint": str, "time_min": int}


def add_job_arguments(p, submit_flag: bool = True) -> None:
    """The resources of a job (slurm.* as flags), --local, --wait; with `submit_flag` also --submit, which
    makes the command a job instead of running here."""
    g = p.add_argument_group("as a job on Slurm (local processes where there is no Slurm)")
    if submit_flag:
        g.add_argument("--submit", action="store_true", help="run as a job with the resources below and slurm.* "
                       "(a requeued job after a preemption resumes)")
    for key, kind in SUBMIT_FLAGS.items():
        g.add_argument("--" + key.replace("_", "-").replace("time-min", "time"), dest=key, type=kind,
                       help=f"sets slurm.{key}")
    g.add_argument("--sbatch", action="append", default=[], help="extra sbatch option key=value (repeatable)")
    g.add_argument("--local", action="store_true", help="run as local processes even where Slurm is")
    g.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's result")


def job_overrides(args) -> list[str]:
    """The job flags as slurm.* overrides."""
    given = [k for k in SUBMIT_FLAGS if getattr(args, k) is not None]
    if hasattr(args, "submit") and not args.submit and (given or args.sbatch or args.local or args.wait):
        from trainer.config.tree import ConfigError
        flag = given[0].replace("_", "-").replace("time-min", "time") if given else "sbatch, --local or --wait"
        raise ConfigError(f"--{flag} is an option of a job: add --submit")
    overrides = [f"slurm.{k}={getattr(args, k)}" for k in given]
    if args.sbatch:
        overrides.append("slurm.extra_sbatch=" + json.dumps(args.sbatch))  # JSON: values may hold commas
    if args.local:
        overrides.append("slurm.executor=local")
    return overrides


def as_job(args) -> bool:
    """--submit given (and the job flags only with it)."""
    job_overrides(args)
    return args.submit


def submit_as_job(args, cfg, workflow: str, kwargs: dict, folder: str) -> int:
    """`workflow(**kwargs)` as a job with `cfg`'s resources (slurm/jobs.py); prints the job id and where its
    logs go, and with --wait rank 0's result."""
    from slurm.jobs import submit_workflow
    job = submit_workflow(cfg, workflow, kwargs, folder, args.argv)
    print_json({"job_id": str(job.job_id), "workflow": workflow, "logs": os.path.join(folder, "slurm")})
    if args.wait:
        print_json({k: v for k, v in job.results()[0].items() if k not in ("images", "labels")})
    return 0
