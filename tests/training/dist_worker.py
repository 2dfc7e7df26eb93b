"""Started by test_distributed.py under torchrun (2 CPU processes, gloo). Not a test module itself.

usage: dist_worker.py RECIPE STEPS STOP [overrides...]
Trains `full` for STEPS steps, then `part` for STOP steps, then `part` again with a fresh Trainer, which
resumes from its checkpoint on disk and continues to STEPS.
"""
import sys

from trainer.config.recipes import load_config
from trainer.engine.distributed import env_from_launcher
from trainer.tasks.training import build_trainer


def main(recipe: str, steps: str, stop: str, *overrides: str) -> None:
    env = env_from_launcher()
    for name, max_steps in (("full", steps), ("part", stop), ("part", steps)):
        cfg = load_config(recipe, [*overrides, f"run.name={name}", f"run.max_steps={max_steps}"], env.world)
        build_trainer(cfg, env).fit()


if __name__ == "__main__":
    main(*sys.argv[1:])
