"""`rectok cache-latents DIT_CONFIG [key=value ...]`: encode a dataset once into the latent cache (and its
statistics) that DiT training reads; resumable, shardable over workers."""
from __future__ import annotations

import argparse

from . import add_recipe_arguments, print_json

EXAMPLES = """examples:
  rectok cache-latents dit/ditdh_xl dit.tokenizer=RUN_OF_STAGE2      # statistics + latent cache, resumable
  rectok cache-latents dit/ditdh_xl dit.tokenizer=RUN_OF_STAGE2 --rank 1 --world 4   # worker 1 of 4: its shards
  rectok cache-latents dit/tiny_dit dit.tokenizer=runs/demo/tiny_stage2 --batch-size 32
"""

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-latents", help="encode a dataset once into a latent cache for DiT training",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    add_recipe_arguments(p, "dotted overrides such as dit.cache_dir=DIR")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward pass")
    p.add_argument("--rank", type=int, default=0, help="this worker's share of the shards (shard %% world)")
    p.add_argument("--world", type=int, default=1, help="number of workers writing the cache together")
    p.set_defaults(fn=run)


def run(args) -> int:
    from trainer.config.recipes import load_config
    from trainer.config.tree import ConfigError
    from trainer.engine.distributed import resolve_device
    from trainer.tasks.latents import cache_latents
    cfg = load_config(args.config, args.overrides)
    if cfg.task != "dit":
        raise ConfigError(f"{args.config} is a {cfg.task!r} recipe; cache-latents reads a DiT recipe "
                          f"(it names the tokenizer, the data and the cache directory)")
    return print_json(cache_latents(cfg, resolve_device(cfg.run.device), args.batch_size, args.rank, args.world))
