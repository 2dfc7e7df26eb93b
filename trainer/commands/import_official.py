"""`rectok import-official --tokenizer FILE --dit FILE [--guide FILE]`: the released RecTok / DiT^DH files ->
runs that sample, evaluate and start training like ours; `--hf DIR`: a folder written by `rectok export --hf`."""
from __future__ import annotations

import argparse

from . import print_json

EXAMPLES = """examples:
  rectok import-official --tokenizer RecTok_decft.pth --dit DiTDH-XL-600ep.pth --guide DiTDH-S-30ep.pth \\
      --out runs/official data.train=data/imagenet_train_256.beton data.val=data/imagenet_val_256.beton
  rectok import-official --tokenizer RecTok.pth         # stage 1 with its semantic decoder -> runs/official/RecTok
  rectok sample runs/official/DiTDH-XL-600ep --out samples --num-images 50000    # then: AutoGuidance, w = 1.29
"""

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-official", help="the released RecTok / DiT^DH files -> runs that sample, evaluate "
                       "and start training like ours", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EXAMPLES)
    p.add_argument("overrides", nargs="*", help="applied to every imported run's config (e.g. data.train=... "
                   "dit.tokenizer=RUN for a DiT whose tokenizer was imported before)")
    p.add_argument("--tokenizer", help="RecTok.pth (stage 1) or RecTok_decft.pth (decoder fine-tuned)")
    p.add_argument("--dit", help="a DiT^DH file (e.g. DiT^DH-XL after 80 or 600 epochs)")
    p.add_argument("--hf", metavar="DIR", action="append", help="a Hugging Face Hub folder written by `rectok "
                   "export RUN --hf DIR` (model.safetensors, config.json): its run, config and weights; repeat it "
                   "for a tokenizer and a DiT, which is then linked to that tokenizer")
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
    if args.hf:
        if args.tokenizer or args.dit or args.guide:
            from trainer.config.tree import ConfigError
            raise ConfigError("import-official: --hf folders are imported on their own, without "
                             "--tokenizer / --dit / --guide")
        from trainer.workflows.hub import import_hub
        return print_json(import_hub(args.hf, args.out, args.overrides, args.force))
    from trainer.workflows.released import import_official
    return print_json(import_official(args.tokenizer, args.dit, args.guide, args.size, args.out,
                                      args.tokenizer_config, args.dit_config, args.guide_config, args.overrides,
                                      args.trust_pickle, args.force))
