"""`rectok` command line: train, info, config, demo."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local files; never wait on a hub


def _train(args) -> int:
    from .config import load_config
    from .loop import train
    result = train(load_config(args.config, args.overrides))  # Trainer checks files before any work
    print(json.dumps({k: v for k, v in result.items() if k not in ("last_train", "at_start")}, indent=2))
    return 0


def _info(args) -> int:
    import torch
    from models import build_model
    with torch.device("meta"):  # shapes only: instant even for the full-size models
        model = build_model(args.name, latent_channels=args.latent_channels)
    print(json.dumps({"name": args.name, "latent_channels": args.latent_channels,
                      "params": model.param_counts(), "forward_flops_per_image": model.flops_per_sample()},
                     indent=2))
    return 0


def _config(args) -> int:
    from .config import config_docs, dump_config, load_config
    if args.docs:
        print(config_docs())
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _demo(args) -> int:
    """Tokenizer stage 1 then stage 2 on the tiny CPU recipe and the default dataset."""
    from .config import load_config
    from .loop import train
    out = os.path.abspath(args.output_dir)
    common = [f"run.output_dir={out}"] + args.overrides
    s1 = train(load_config("rectok/tiny_stage1", common))
    s2 = train(load_config("rectok/tiny_stage2", common + [f"tokenizer.init_from={s1['run_dir']}"]))
    print("\nDemo finished.")
    for name, r in (("stage 1", s1), ("stage 2", s2)):
        before = f"{r['at_start']['eval/psnr_ema']:.2f} dB before training -> " if r["at_start"] else ""
        print(f"  {name}: PSNR {before}raw {r['eval/psnr_raw']:.2f} dB, EMA {r['eval/psnr_ema']:.2f} dB")
        print(f"    reconstructions: {r['eval/grid']}")
        print(f"    metrics:         {r['metrics']}")
        print(f"    checkpoint:      {r['checkpoint']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rectok", description="RecTok tokenizer and DiT^DH trainer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a recipe: rectok train CONFIG [key=value ...]")
    t.add_argument("config", help="YAML recipe path or bundled name (e.g. rectok/tiny_stage1)")
    t.add_argument("overrides", nargs="*", help="dotted overrides such as optim.base_lr=2e-4")
    t.set_defaults(fn=_train)
    i = sub.add_parser("info", help="parameter counts and forward FLOPs of a registered model (JSON)")
    i.add_argument("name")
    i.add_argument("--latent-channels", type=int, default=128)
    i.set_defaults(fn=_info)
    c = sub.add_parser("config", help="print the resolved config, or --docs for every key")
    c.add_argument("config", nargs="?")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--docs", action="store_true")
    c.set_defaults(fn=_config)
    d = sub.add_parser("demo", help="tiny stage 1 + stage 2 on the default dataset (CPU, minutes)")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .config_tree import ConfigError
    from models.weights import MissingWeightsError
    try:
        return args.fn(args)
    except (ConfigError, MissingWeightsError, FileNotFoundError) as e:
        print(f"rectok: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
