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
