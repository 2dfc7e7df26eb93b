"""`rectok demo`: the whole pipeline at toy size on the bundled default dataset (CPU, minutes)."""
from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline at toy size on the default dataset (CPU, minutes)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                              "  rectok demo                                  # under runs/demo/, about 9 minutes\n"
                              "  rectok demo eval.inception_weights=random    # also rFID/gFID with a random Inception")
    p.add_argument("--output-dir", default="runs/demo", help="where the demo's runs and report go")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.inception_weights=random")
    p.set_defaults(fn=run)


def run(args) -> int:
    from trainer.workflows.demo import run_demo
    run_demo(os.path.abspath(args.output_dir), args.overrides)
    return 0
