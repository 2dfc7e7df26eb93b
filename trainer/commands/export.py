"""`rectok export RUN --out FILE`: one consolidated safetensors file of a checkpoint's EMA (or raw) weights,
with --official a .pth in the released code's layout, with --hf DIR a Hugging Face Hub folder."""
from __future__ import annotations

import argparse

from . import print_json

EXAMPLES = """examples:
  rectok export runs/tiny_stage1 --out tok.safetensors   # EMA weights, the config in the metadata
  rectok export runs/tiny_stage1 --hf hub/tiny_stage1    # a Hub folder: model.safetensors, config.json, README.md
  huggingface-cli upload USER/tiny_stage1 hub/tiny_stage1   # publishes it (edit the card's license first)
  rectok import-official --hf hub/tiny_stage1 --out runs/hub   # ... and back into a run directory
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="one consolidated safetensors file of a checkpoint's EMA weights, or "
                       "--official: raw and EMA weights in the released code's layout, or --hf: a Hub folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("checkpoint", help="run directory or checkpoint directory (any strategy, any world size)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="output .safetensors file (--official: .pth)")
    out.add_argument("--hf", metavar="DIR", help="a Hugging Face Hub folder: model.safetensors, config.json and a "
                     "model card README.md (`rectok import-official --hf DIR` reads it back; `huggingface-cli upload "
                     "USER/REPO DIR` publishes it)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--official", action="store_true", help="a .pth with `model` and `model_ema` in the released "
                   "RecTok / DiT^DH key layout (docs/reference.md §7)")
    p.set_defaults(fn=run)


def run(args) -> int:
    if args.hf:
        if args.official:
            from trainer.config.tree import ConfigError
            raise ConfigError("export: --hf and --official are two formats; give one")
        from trainer.workflows.hub import export_hub
        return print_json(export_hub(args.checkpoint, args.hf, use_ema=not args.raw))
    if args.official:
        from trainer.workflows.released import export_official
        return print_json(export_official(args.checkpoint, args.out))
    from trainer.parallel.consolidate import export_weights
    return print_json(export_weights(args.checkpoint, args.out, use_ema=not args.raw))
