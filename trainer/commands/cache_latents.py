"""`rectok cache-latents DIT_CONFIG [key=value ...]`: encode a dataset once into the latent cache (and its
statistics) that DiT training reads; resumable, shardable over workers."""
from __future__ import annotations

import argparse

from . import add_job_arguments, add_recipe_arguments, as_job, job_overrides, print_json, submit_as_job

EXAMPLES = """examples:
  rectok cache-latents dit/ditdh_xl dit.tokenizer=RUN_OF_STAGE2      # statistics + latent cache, resumable
  rectok cache-latents dit/ditdh_xl dit.tokenizer=RUN_OF_STAGE2 --rank 1 --world 4   # worker 1 of 4: its shards
  rectok cache-latents dit/tiny_dit dit.tokenizer=runs/demo/tiny_stage2 --batch-size 32
  rectok cache-latents dit/ditdh_xl dit.tokenizer=RUN_OF_STAGE2 --submit --nodes 2 --gpus-per-node 8   # a job
"""

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-latents", help="encode a dataset once into a latent cache for DiT training",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    add_recipe_arguments(p, "dotted overrides such as dit.cache_dir=DIR")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward pass")
    p.add_argument("--rank", type=int, default=0, help="this worker's share of the shards (shard %% world)")
    p.add_argument("--world", type=int, default=1, help="number of workers writing the cache together")
    add_job_arguments(p)
    p.set_defaults(fn=run)


def run(args) -> int:
    from trainer.config.recipes import dump_config, load_config
    from trainer.config.tree import ConfigError
    from trainer.engine.distributed import resolve_device
    from trainer.tasks.latents import cache_dir_for, cache_latents
    cfg = load_config(args.config, list(args.overrides) + job_overrides(args))
    if cfg.task != "dit":
        raise ConfigError(f"{args.config} is a {cfg.task!r} recipe; cache-latents reads a DiT recipe "
                          f"(it names the tokenizer, the data and the cache directory)")
    if as_job(args):  # the job's ranks split the shards
        return submit_as_job(args, cfg, "cache-latents", {"cfg_yaml": dump_config(cfg), "batch_size": args.batch_size},
                             cache_dir_for(cfg))
    return print_json(cache_latents(cfg, resolve_device(cfg.run.device), args.batch_size, args.rank, args.world))
