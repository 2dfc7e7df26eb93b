"""`rectok config CONFIG [key=value ...]`: the resolved config as YAML; --docs: every key with its type,
default and meaning. `rectok recipes`: the bundled recipes, one line each."""
from __future__ import annotations

import argparse

from trainer.config.catalog import recipe_listing


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config, or --docs for every key",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  rectok config rectok/tiny_stage1 optim.base_lr=1e-3\n"
                              "  rectok config --docs | grep sample.")
    p.add_argument("config", nargs="?", help="YAML recipe path or bundled name (`rectok recipes` lists them)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.base_lr=2e-4")
    p.add_argument("--docs", action="store_true", help="every key with its type, default and meaning")
    p.set_defaults(fn=run)
    r = sub.add_parser("recipes", help="the bundled recipes (configs/), one line each",
                       epilog="example: rectok recipes; rectok train dit/tiny_dit dit.tokenizer=runs/demo/tiny_stage2")
    r.set_defaults(fn=run_recipes)


def run_recipes(args) -> int:
    print(recipe_listing())
    return 0


def run(args) -> int:
    from trainer.config.recipes import config_docs, dump_config, load_config
    if args.docs:
        print(config_docs())
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0
