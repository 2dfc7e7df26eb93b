"""`rectok train CONFIG [key=value ...]`: one training run in this process, or one rank of it under
torchrun (the world comes from the launcher's environment)."""
from __future__ import annotations

import argparse

from trainer.config.catalog import TRAINING, recipe_listing

from . import add_recipe_arguments, print_json

EXAMPLES = """examples:
  rectok train rectok/tiny_stage1                                  # the CPU demo's tokenizer, minutes
  rectok train rectok/stage1_d128 data.train=IN.beton data.val=VAL.beton run.name=s1
  torchrun --nproc_per_node 8 -m trainer.cli train dit/ditdh_xl dit.tokenizer=runs/s2 parallel.strategy=fsdp
  rectok submit dit/ditdh_xl --nodes 4 dit.tokenizer=runs/s2       # the same on Slurm, preemption-safe
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train from a recipe: rectok train CONFIG [key=value ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EXAMPLES + "\nbundled recipes (CONFIG):\n" + recipe_listing(TRAINING))
    add_recipe_arguments(p)
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run directory although the model, data, schedule or optimizer changed "
                        "(sets checkpoint.allow_config_change)")
    p.set_defaults(fn=run)


def run(args) -> int:
    from trainer.config.recipes import load_config
    from trainer.engine.distributed import env_from_launcher
    from trainer.tasks.training import run_training
    env = env_from_launcher()
    overrides = list(args.overrides) + (["checkpoint.allow_config_change=true"] if args.allow_config_change else [])
    result, _ = run_training(load_config(args.config, overrides, env.world), env)
    if env.main:
        print_json({k: v for k, v in result.items() if k not in ("last_train", "at_start")})
    return 0
