"""`rectok export RUN --out FILE`: one consolidated safetensors file of a checkpoint's EMA (or raw) weights,
or with --official a .pth in the released code's layout."""
from __future__ import annotations

import argparse

from . import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="one consolidated safetensors file of a checkpoint's EMA weights, or "
                       "--official: raw and EMA weights in the released code's layout")
    p.add_argument("checkpoint", help="run directory or checkpoint directory (any strategy, any world size)")
    p.add_argument("--out", required=True, help="output .safetensors file (--official: .pth)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--official", action="store_true", help="a .pth with `model` and `model_ema` in the released "
                   "RecTok / DiT^DH key layout (docs/reference.md §7)")
    p.set_defaults(fn=run)


def run(args) -> int:
    if args.official:
        from trainer.workflows.released import export_official
        return print_json(export_official(args.checkpoint, args.out))
    from trainer.parallel.consolidate import export_weights
    return print_json(export_weights(args.checkpoint, args.out, use_ema=not args.raw))
