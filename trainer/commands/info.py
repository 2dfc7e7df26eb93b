"""`rectok info NAME`: parameter counts and forward FLOPs per image of a registered model, as JSON."""
from __future__ import annotations

import argparse

from . import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts and forward FLOPs of a registered model (JSON)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                              "  rectok info RecTok-BB                       # the tokenizer\n"
                              "  rectok info DiTDH-XL                        # 835.32M parameters, 321 GFLOP\n"
                              "  rectok info DiTDH-XL --latent-channels 32")
    p.add_argument("name", help="a registered model, e.g. RecTok-BB or DiTDH-XL")
    p.add_argument("--latent-channels", type=int, default=128)
    p.set_defaults(fn=run)


def run(args) -> int:
    import torch

    from models import build_model
    with torch.device("meta"):  # shapes only: instant even for the full-size models
        model = build_model(args.name, latent_channels=args.latent_channels)
    return print_json({"name": args.name, "latent_channels": args.latent_channels, "params": model.param_counts(),
                       "forward_flops_per_image": model.flops_per_sample()})
