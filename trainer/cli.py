"""`rectok`: the command line. Each command lives in trainer/commands/ and registers its own parser."""
from __future__ import annotations

import argparse
import errno
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
    p = argparse.ArgumentParser(prog="rectok", description="RecTok tokenizer and DiT^DH trainer",
                                epilog="Errors print as one line; --debug (anywhere) prints the full traceback.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def describe_error(e: BaseException) -> tuple[str, int]:
    """One line for an error and the exit code: 2 for what the user must fix (config, data, weights,
    checkpoints, the run directory), 1 for what happened to the run (a non-finite loss, a full disk)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from data import DataError
    from models.released_layout import OfficialLayoutError
    from models.weights import MissingWeightsError, UnreadableWeightsError
    from trainer.config.tree import ConfigError
    from trainer.engine.checkpoint import CheckpointError, library_error
    from trainer.engine.loop import NonFiniteLossError
    from trainer.tasks.latents import ForeignCacheError
    if isinstance(e, (ConfigError, DataError, MissingWeightsError, UnreadableWeightsError, OfficialLayoutError,
                      FileNotFoundError, ForeignCacheError, CheckpointError)):
        return str(e), 2
    if isinstance(e, NonFiniteLossError):
        return str(e), 1
    if isinstance(e, CheckpointException):  # the checkpoint library's, holding one error per rank
        inner = library_error(e)
        if inner is e:
            return f"checkpoint files: {str(e).splitlines()[0]}", 1
        message, code = describe_error(inner)
        return f"checkpoint files: {message}", code
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {e.filename or 'a file'}: {e.strerror} (disk full or quota reached)", 1
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {e.filename or 'a file'}: {e.strerror} (is the directory writable?)", 2
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter failed" in str(e) or "enforce fail at inline_container"
                                         in str(e)):  # torch.save's C++ writer, which names no file or cause
        return f"a checkpoint file could not be written (disk full or quota reached?): {str(e).splitlines()[0]}", 1
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first} (rerun with --debug for the traceback)", 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere: `rectok train X --debug` reads as naturally as before it
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # Dotted overrides may follow options (`rectok sample RUN --out D sample.steps=50`): argparse leaves
    # them unparsed, so they are collected here; anything else unknown is still an error.
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # recorded with each submission
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    # Imported once the command is known, so that `rectok --help` stays fast: the logging set-up (first,
    # before any import can configure the root logger).
    from trainer.engine.tracking import configure_logging
    configure_logging(int(os.environ.get("RANK", 0)) == 0)  # under torchrun, RANK is set
    try:
        return args.fn(args)
    except BaseException as e:  # the checkpoint library's CheckpointException is not an Exception
        if debug or isinstance(e, SystemExit):
            raise
        message, code = describe_error(e)
        print(f"rectok: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
