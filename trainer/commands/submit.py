"""`rectok submit CONFIG [key=value ...]`: one training run as a Slurm job (or local processes without
Slurm), resources from slurm.* and the flags below."""
from __future__ import annotations

import argparse
import os

from . import add_job_arguments, add_recipe_arguments, job_overrides, print_json

EXAMPLES = """examples:
  rectok submit rectok/stage1_d128 --nodes 4 --gpus-per-node 8 --partition gpu --account A --time 4320
  rectok submit rectok/tiny_stage1 run.max_steps=20          # no Slurm here: local processes
  rectok submit dit/ditdh_xl dit.tokenizer=runs/s2 --nodes 4 --gpus-per-node 8 --time 4320 --wait
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="one training run as a Slurm job (or local processes without Slurm)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    add_recipe_arguments(p, "dotted overrides, slurm.* included")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run directory although the model, data, schedule or optimizer changed "
                        "(sets checkpoint.allow_config_change)")
    add_job_arguments(p, submit_flag=False)
    p.set_defaults(fn=run)


def run(args) -> int:
    from slurm.submit import submit
    from trainer.config.recipes import load_config
    overrides = job_overrides(args)
    if args.allow_config_change:
        overrides.append("checkpoint.allow_config_change=true")
    cfg = load_config(args.config, list(args.overrides) + overrides)
    job = submit(cfg, args.argv)
    print_json({"job_id": str(job.job_id), "run_dir": cfg.run_dir, "logs": os.path.join(cfg.run_dir, "slurm")})
    if args.wait:
        result = job.results()[0]  # rank 0's result
        print_json({k: v for k, v in result.items() if k not in ("last_train", "at_start")})
    return 0
