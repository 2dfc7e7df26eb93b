"""`rectok`: the command line. Each command lives in trainer/commands/ and registers its own parser."""
from __future__ import annotations

import argparse
import os
import sys

from trainer.commands import (
    cache_latents,
    config,
    data_prep,
    demo,
    evaluate,
    export,
    import_official,
    info,
    profiling,
    report,
    sample,
    submit,
    sweep,
    train,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local files; never wait on a hub

COMMANDS = (train, data_prep, submit, sweep, evaluate, report, cache_latents, sample, export, import_official, info,
            config, profiling, demo)  # the order of `rectok --help`


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rectok", description="RecTok tokenizer and DiT^DH trainer")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Dotted overrides may follow options (`rectok sample RUN --out D sample.steps=50`): argparse leaves
    # them unparsed, so they are collected here; anything else unknown is still an error.
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with each submission
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    # Imported once the command is known, so that `rectok --help` stays fast: the logging set-up (first,
    # before any import can configure the root logger), then the errors a user can fix, printed as one line.
    from trainer.engine.tracking import configure_logging
    configure_logging(int(os.environ.get("RANK", 0)) == 0)  # under torchrun, RANK is set
    from data import DataError
    from models.released_layout import OfficialLayoutError
    from models.weights import MissingWeightsError, UnreadableWeightsError
    from trainer.config.tree import ConfigError
    from trainer.tasks.latents import ForeignCacheError
    try:
        return args.fn(args)
    except (ConfigError, DataError, MissingWeightsError, UnreadableWeightsError, OfficialLayoutError,
            FileNotFoundError, ForeignCacheError) as e:
        print(f"rectok: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
