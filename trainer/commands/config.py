"""`rectok config CONFIG [key=value ...]`: the resolved config as YAML; --docs: every key with its type,
default and meaning. `rectok recipes`: the bundled recipes, one line each. `rectok fetch-weights [NAMES...]`:
download the weight files the recipes read (configs/weights.yaml; opt-in, resumable, verified); `rectok
check-weights [NAMES...]`: verify them on disk. Both use the weights directory: --dir, else
$RECTOK_WEIGHTS, else ./weights."""
from __future__ import annotations

import argparse
import sys

from trainer.config.catalog import recipe_listing


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config, or --docs for every key",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  rectok config rectok/tiny_stage1 optim.base_lr=1e-3\n"
                              "  rectok config --docs | grep sample.")
    p.add_argument("config", nargs="?", help="YAML recipe path or bundled name (`rectok recipes` lists them)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.base_lr=2e-4")
    p.add_argument("--docs", action="store_true", help="every key with its type, default and meaning")
    p.set_defaults(fn=run)
    r = sub.add_parser("recipes", help="the bundled recipes (configs/), one line each",
                       epilog="example: rectok recipes; rectok train dit/tiny_dit dit.tokenizer=runs/demo/tiny_stage2")
    r.set_defaults(fn=run_recipes)
    register_weights(sub)


def run_recipes(args) -> int:
    print(recipe_listing())
    return 0


def run(args) -> int:
    from trainer.config.recipes import config_docs, dump_config, load_config
    if args.docs:
        print(config_docs())
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


# -- weights ----------------------------------------------------------------------------------------------

FETCH_EXAMPLES = """examples:
  rectok check-weights                                  # what is there, what is missing, and the command to fetch it
  rectok fetch-weights dinov2-l14 vgg16 convnext-small  # stage 1 at C = 32 / 16 (DINOv2 teacher), into ./weights
  rectok fetch-weights inception-fid adm-imagenet256 --dir /shared/weights   # FID, sFID, IS against ADM's batch
  rectok fetch-weights dinov3-l16 --url 'https://dinov3.llamameta.net/...'   # gated: the signed URL from Meta's e-mail
  RECTOK_WEIGHTS=/shared/weights rectok train rectok/stage1_d32   # recipes read weights/FILE from there

No NAMES: every file with a public URL (the gated DINOv3 is skipped with the way to get it). An interrupted
download continues where it stopped (rerun the same command); a file appears under its name only once its
size and checksum match the manifest.
"""

CHECK_EXAMPLES = """examples:
  rectok check-weights                            # every file of configs/weights.yaml in ./weights (or $RECTOK_WEIGHTS)
  rectok check-weights vgg16 convnext-small --dir /shared/weights

Each line: ok, unverified (present; the manifest has no checksum for it), missing, wrong size or wrong
checksum, with the fetch command for the last three. The exit code is 1 when a named file is not ok.
"""

DIR_HELP = "the weights directory (default: $RECTOK_WEIGHTS, else ./weights)"
MANIFEST_HELP = "another weights manifest, e.g. pointing at a mirror (default: the repository's configs/weights.yaml)"


def register_weights(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fetch-weights", help="download weight files of configs/weights.yaml (opt-in, resumable, "
                       "verified against the checksum)", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=FETCH_EXAMPLES)
    f.add_argument("names", nargs="*", metavar="NAME", help="manifest names (`rectok check-weights` lists them); "
                   "none: every file with a public URL")
    f.add_argument("--dir", help=DIR_HELP)
    f.add_argument("--url", help="download this URL instead of the manifest's (one NAME; for the gated DINOv3, "
                   "the signed URL Meta sends); the checksum is still checked")
    f.add_argument("--retries", type=int, default=5, help="retries of an interrupted transfer within this run "
                   "(default 5; a later run continues from the bytes kept in FILE.part anyway)")
    f.add_argument("--manifest", help=MANIFEST_HELP)
    f.set_defaults(fn=run_fetch)
    c = sub.add_parser("check-weights", help="verify the weight files on disk against configs/weights.yaml "
                       "(missing, wrong size, wrong checksum, ok)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHECK_EXAMPLES)
    c.add_argument("names", nargs="*", metavar="NAME", help="manifest names (none: every entry)")
    c.add_argument("--dir", help=DIR_HELP)
    c.add_argument("--manifest", help=MANIFEST_HELP)
    c.set_defaults(fn=run_check)


def run_fetch(args) -> int:
    from trainer.workflows.weights import fetch_weights
    outcomes = fetch_weights(args.names, args.dir, args.manifest, args.url, max(0, args.retries), sys.stderr)
    return 1 if any(o.failed for o in outcomes) else 0


def run_check(args) -> int:
    from trainer.workflows.weights import check_weights
    checks = check_weights(args.names, args.dir, args.manifest)
    for check in checks:
        print(check.line)
    return 0 if all(c.verdict.passing for c in checks) else 1
