"""`rectok config CONFIG [key=value ...]`: the resolved config as YAML; --docs: every key with its type,
default and meaning."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config, or --docs for every key")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--docs", action="store_true")
    p.set_defaults(fn=run)


def run(args) -> int:
    from trainer.config.recipes import config_docs, dump_config, load_config
    if args.docs:
        print(config_docs())
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0
