"""`rectok sample RUN --out DIR [key=value ...]`: images from a DiT checkpoint as PNGs and samples.npz."""
from __future__ import annotations

import argparse

from . import add_job_arguments, as_job, job_overrides, print_json, submit_as_job

EXAMPLES = """examples:
  rectok sample runs/ditdh_xl_600ep --out samples --num-images 50000  # PNGs + samples.npz (class i mod 1000)
  rectok sample runs/ditdh_xl_600ep --out samples_ag --num-images 50000 \\
      sample.guidance=autoguidance sample.guide=runs/ditdh_s_guide_30ep sample.scale=1.29
  rectok sample runs/ditdh_xl_600ep --out samples_cfg --labels 207,360,387 sample.guidance=cfg sample.scale=1.5
"""

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="images from a DiT checkpoint: PNGs and samples.npz",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("checkpoint", help="DiT run directory, checkpoint directory or state file")
    p.add_argument("overrides", nargs="*", help="e.g. sample.guidance=cfg sample.scale=1.5 sample.steps=150")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-images", type=int, default=50, help="images, class i mod K for image i")
    p.add_argument("--labels", help="comma-separated class labels instead (one image each)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    add_job_arguments(p)
    p.set_defaults(fn=run)


def run(args) -> int:
    from trainer.tasks.sampling import sample_from_checkpoint
    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    if as_job(args):
        from trainer.config.tree import ConfigError
        from trainer.engine.checkpoint import saved_config
        if labels:
            raise ConfigError("--labels: a job samples --num-images balanced over the classes; drop --submit")
        cfg = saved_config(args.checkpoint, list(args.overrides) + job_overrides(args), task="dit")
        return submit_as_job(args, cfg, "sample", {"checkpoint": args.checkpoint, "overrides": args.overrides,
                                                   "out_dir": args.out, "num_images": args.num_images,
                                                   "use_ema": not args.raw}, args.out)
    out = sample_from_checkpoint(args.checkpoint, args.overrides, args.out, args.num_images, labels,
                                 use_ema=not args.raw)
    return print_json({k: v for k, v in out.items() if k not in ("images", "labels")})
