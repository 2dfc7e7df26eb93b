"""`rectok report RUN [key=value ...]`: the pictures of a tokenizer or DiT run, as PNGs in RUN/pictures."""
from __future__ import annotations

import argparse

from . import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="the pictures of a tokenizer or DiT run, as PNGs in RUN/pictures",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                              "  rectok report runs/rectok_stage1_d128          # pictures, in RUN/pictures/\n"
                              "  rectok report runs/ditdh_xl_600ep sample.steps=50 sample.guidance=autoguidance \\\n"
                              "      sample.guide=runs/ditdh_s_guide_30ep --out pictures_ag")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("overrides", nargs="*", help="e.g. data.val=VAL.beton sample.steps=50 sample.guidance=autoguidance")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN/pictures)")
    p.add_argument("--columns", type=int, default=0, help="images (tokenizer, 8) or classes (DiT, 10) per row")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.set_defaults(fn=run)


def run(args) -> int:
    from trainer.workflows.report import run_report
    return print_json(run_report(args.run, args.out, args.overrides, args.columns, not args.raw))
