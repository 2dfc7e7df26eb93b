"""`rectok data write-ffcv`: an image folder or list file -> an FFCV .beton of ADM centre crops."""
from __future__ import annotations

import argparse

from . import print_json

WRITE_FFCV_EXAMPLES = """examples:
  rectok data write-ffcv --src IMAGENET/train --out data/imagenet_train_256.beton   # <synset>/*.JPEG
  rectok data write-ffcv --src IMAGENET/val --out data/imagenet_val_256.beton --storage raw
  rectok data write-ffcv --src val_list.txt --root IMAGENET/val --out data/val_256.beton   # '<path> <label>' lines
"""

def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset preparation", formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="examples:\n"
                                 "  rectok data write-ffcv --src IMAGENET/train --out data/imagenet_train_256.beton\n"
                                 "  rectok data write-ffcv --src IMAGENET/val   --out data/imagenet_val_256.beton")
    data = data.add_subparsers(dest="data_command", required=True)
    w = data.add_parser("write-ffcv", help="an image folder or list file -> an FFCV .beton of ADM centre crops",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=WRITE_FFCV_EXAMPLES)
    w.add_argument("--src", required=True,
                   help="a split folder (<synset>/<image>, labels in sorted-synset order) or a list file of "
                        "'<relative path> <label>' lines")
    w.add_argument("--out", required=True, help="output .beton (written to a temporary file, renamed when complete)")
    w.add_argument("--size", type=int, default=256, help="output resolution of the ADM centre crop")
    w.add_argument("--storage", choices=("jpeg", "raw"), default="jpeg", help="JPEG (about 8x smaller) or raw pixels")
    w.add_argument("--quality", type=int, default=95, help="JPEG quality")
    w.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    w.add_argument("--root", default=None, help="list files: the folder paths are relative to (default: the list's)")
    w.set_defaults(fn=run_write_ffcv)


def run_write_ffcv(args) -> int:
    from data.ffcv_loader import report_path
    from data.ffcv_writer import write_ffcv
    report = write_ffcv(args.src, args.out, args.size, args.storage, args.quality, args.workers, args.root)
    summary = {k: v for k, v in report.items() if k not in ("skipped_files", "classes")}
    return print_json({**summary, "classes": len(report["classes"] or []), "report": report_path(args.out)})
