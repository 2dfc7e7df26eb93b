"""`rectok train CONFIG [key=value ...]`: one training run in this process, or one rank of it under
torchrun (the world comes from the launcher's environment)."""
from __future__ import annotations

import argparse

from . import add_recipe_arguments, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train from a recipe: rectok train CONFIG [key=value ...]")
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
