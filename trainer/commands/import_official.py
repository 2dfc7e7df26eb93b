"""`rectok import-official --tokenizer FILE --dit FILE [--guide FILE]`: the released RecTok / DiT^DH files ->
runs that sample, evaluate and start training like ours."""
from __future__ import annotations

import argparse

from . import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-official", help="the released RecTok / DiT^DH files -> runs that sample, evaluate "
                       "and start training like ours")
    p.add_argument("overrides", nargs="*", help="applied to every imported run's config (e.g. data.train=... "
                   "dit.tokenizer=RUN for a DiT whose tokenizer was imported before)")
    p.add_argument("--tokenizer", help="RecTok.pth (stage 1) or RecTok_decft.pth (decoder fine-tuned)")
    p.add_argument("--dit", help="a DiT^DH file (e.g. DiT^DH-XL after 80 or 600 epochs)")
    p.add_argument("--size", help="--dit's size (S, B, L, XL): read from the file when left out, checked when given")
    p.add_argument("--guide", help="the 30-epoch DiT^DH-S: imported too; the --dit run then samples with "
                   "AutoGuidance by it at w = 1.29")
    p.add_argument("--out", default="runs/official", help="folder of the imported runs, one per file, named after it")
    p.add_argument("--tokenizer-config", help="recipe for the tokenizer run (default: rectok/stage1_d128 for a "
                   "file with its semantic decoder, else rectok/stage2_decoder_ft)")
    p.add_argument("--dit-config", help="recipe for the DiT run (default: dit/ditdh_<size>)")
    p.add_argument("--guide-config", help="recipe for the guide run (default: dit/ditdh_s_guide_30ep)")
    p.add_argument("--trust-pickle", action="store_true", help="load files that pickle Python objects besides "
                   "tensors (unpickling can run code: only for files you trust)")
    p.add_argument("--force", action="store_true", help="replace the checkpoints of runs imported before")
    p.set_defaults(fn=run)


def run(args) -> int:
    from trainer.workflows.released import import_official
    return print_json(import_official(args.tokenizer, args.dit, args.guide, args.size, args.out,
                                      args.tokenizer_config, args.dit_config, args.guide_config, args.overrides,
                                      args.trust_pickle, args.force))
