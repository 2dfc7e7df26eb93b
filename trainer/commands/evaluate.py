"""`rectok eval {ref-stats, generator, tokenizer, probe}`: evaluation by the paper's protocol, under torchrun
split over the ranks; results go to RUN/eval/ by default, where `rectok sweep --plot` finds them."""
from __future__ import annotations

import argparse
import os

from . import add_job_arguments, as_job, job_overrides, print_json, run_and_print_on_rank0, submit_as_job

REF_STATS_EXAMPLES = """examples:
  rectok eval ref-stats --data data/imagenet_val_256.beton --out weights/imagenet_val_256.npz
  rectok eval ref-stats --data IMAGENET/val --loader pil --out weights/imagenet_val_256.npz
  torchrun --nproc_per_node 8 -m trainer.cli eval ref-stats --data data/imagenet_val_256.beton --out REF.npz
"""
GENERATOR_EXAMPLES = """examples:
  rectok eval generator runs/ditdh_xl_600ep sample.guidance=autoguidance sample.guide=runs/ditdh_s_guide_30ep \\
      sample.scale=1.5 --num-images 50000                           # against eval.reference (ADM's file)
  torchrun --nproc_per_node 8 -m trainer.cli eval generator runs/ditdh_xl_600ep --num-images 50000   # 8x faster
  rectok eval generator runs/ditdh_xl_600ep sample.guidance=cfg sample.scale=1.5 eval.classifier=auto
"""
TOKENIZER_EXAMPLES = """examples:
  rectok eval tokenizer runs/rectok_stage1_d128 eval.reference=weights/imagenet_val_256.npz
  rectok eval tokenizer runs/official/RecTok_decft                               # rFID, PSNR
  torchrun --nproc_per_node 8 -m trainer.cli eval tokenizer runs/rectok_stage1_d128 --num-images 10000
"""
PROBE_EXAMPLES = """examples:
  rectok eval probe runs/rectok_stage1_d128 --t 0.5                  # linear probes: clean latents and x_t
  rectok eval probe runs/rectok_stage1_d128 --pool flatten --num-train 10000 --num-val 5000
"""
EVAL_EXAMPLES = """examples:
  rectok eval ref-stats --data data/imagenet_val_256.beton --out weights/imagenet_val_256.npz
  rectok eval tokenizer runs/rectok_stage1_d128 eval.reference=weights/imagenet_val_256.npz
  torchrun --nproc_per_node 8 -m trainer.cli eval generator runs/ditdh_xl_600ep --num-images 50000
  rectok eval probe runs/rectok_stage1_d128 --t 0.5                  # linear probes: clean latents and x_t
(ref-stats, tokenizer and generator split the images over the ranks under torchrun: the same numbers, faster)
"""

def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluation by the paper's protocol",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EVAL_EXAMPLES)
    ev = ev.add_subparsers(dest="eval_command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    rs = ev.add_parser("ref-stats", help="FID reference statistics (.npz: mu, sigma, features) of a dataset",
                       formatter_class=raw, epilog=REF_STATS_EXAMPLES)
    rs.add_argument("--data", required=True, help="a .beton (--loader ffcv) or an image folder / list file (pil)")
    rs.add_argument("--out", required=True, help="output .npz")
    rs.add_argument("--loader", choices=("ffcv", "pil"), default="ffcv")
    rs.add_argument("--size", type=int, default=256, help="image size (the ADM centre crop for pil)")
    rs.add_argument("--inception-weights", default=None,
                    help="local Inception-v3 file (default: eval.inception_weights)")
    rs.add_argument("--batch-size", type=int, default=100)
    rs.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    rs.set_defaults(fn=run_ref_stats)
    eg = ev.add_parser("generator", help="gFID, IS, precision and recall of a DiT checkpoint's samples, and their "
                                         "class accuracy when eval.classifier names a class judge (or auto)",
                       formatter_class=raw, epilog=GENERATOR_EXAMPLES)
    eg.add_argument("checkpoint", help="DiT run directory or checkpoint directory")
    eg.add_argument("overrides", nargs="*", help="e.g. eval.reference=REF.npz sample.guidance=cfg sample.scale=1.5 "
                                                    "eval.classifier=auto")
    eg.add_argument("--num-images", type=int, default=50_000, help="samples, balanced over the classes")
    eg.add_argument("--out", default=None, help="folder for eval_generator.json (default: RUN/eval)")
    eg.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    add_job_arguments(eg)
    eg.set_defaults(fn=run_generator)
    et = ev.add_parser("tokenizer", help="rFID and PSNR of a tokenizer's reconstructions (raw and EMA weights)",
                       formatter_class=raw, epilog=TOKENIZER_EXAMPLES)
    et.add_argument("checkpoint", help="tokenizer run directory or checkpoint directory")
    et.add_argument("overrides", nargs="*", help="e.g. eval.reference=VAL.npz data.val=VAL.beton")
    et.add_argument("--num-images", type=int, default=0, help="N validation images spread over the classes (0 = all)")
    et.add_argument("--out", default=None, help="folder for eval_tokenizer.json (default: RUN/eval)")
    et.add_argument("--batch-size", type=int, default=50)
    add_job_arguments(et)
    et.set_defaults(fn=run_tokenizer)
    ep = ev.add_parser("probe", help="top-1 of linear probes on a tokenizer's latents and on the noised x_t",
                       formatter_class=raw, epilog=PROBE_EXAMPLES)
    ep.add_argument("checkpoint", help="tokenizer run directory or checkpoint directory")
    ep.add_argument("overrides", nargs="*", help="e.g. data.train=... data.val=...")
    ep.add_argument("--t", type=float, default=0.5, help="flow time of x_t (1 = data, 0 = noise)")
    ep.add_argument("--pool", choices=("mean", "flatten"), default="mean", help="features: pooled or all tokens")
    ep.add_argument("--num-train", type=int, default=0, help="N training images spread over the classes (0 = all)")
    ep.add_argument("--num-val", type=int, default=0, help="N validation images spread over the classes (0 = all)")
    ep.add_argument("--epochs", type=int, default=100)
    ep.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    ep.add_argument("--out", default=None, help="folder for eval_probe.json (default: RUN/eval)")
    add_job_arguments(ep)
    ep.set_defaults(fn=run_probe)


def run_ref_stats(args) -> int:
    from trainer.config.schema import TrainConfig
    from trainer.workflows.evaluate import reference_stats
    weights = args.inception_weights or TrainConfig().eval.inception_weights
    return run_and_print_on_rank0(lambda: reference_stats(args.data, args.out, weights, args.loader, args.size,
                                                          args.batch_size, args.device))


def _out_dir(args) -> str:
    """--out, by default the run's eval/ folder (where `rectok sweep --plot` finds the results)."""
    from trainer.engine.checkpoint import run_dir_of
    return args.out or os.path.join(run_dir_of(args.checkpoint), "eval")


def _as_job(args, workflow: str, task: str, **kwargs) -> int:
    """The evaluation as a job with the checkpoint's slurm.* and the job flags (slurm/jobs.py)."""
    from trainer.engine.checkpoint import saved_config
    cfg = saved_config(args.checkpoint, list(args.overrides) + job_overrides(args), task=task)
    kwargs = {"checkpoint": args.checkpoint, "overrides": args.overrides, "out_dir": _out_dir(args),
              "progress": False, **kwargs}
    return submit_as_job(args, cfg, workflow, kwargs, kwargs["out_dir"])


def run_generator(args) -> int:
    from trainer.workflows.evaluate import evaluate_generator
    if as_job(args):  # a preempted job resumes after the samples already featurised
        return _as_job(args, "eval-generator", "dit", num_images=args.num_images, use_ema=not args.raw)
    return run_and_print_on_rank0(lambda: evaluate_generator(args.checkpoint, args.overrides, args.num_images,
                                                             _out_dir(args), use_ema=not args.raw))


def run_tokenizer(args) -> int:
    from trainer.workflows.evaluate import evaluate_tokenizer
    if as_job(args):
        return _as_job(args, "eval-tokenizer", "tokenizer", num_images=args.num_images, batch=args.batch_size)
    return run_and_print_on_rank0(lambda: evaluate_tokenizer(args.checkpoint, args.overrides, args.num_images,
                                                             _out_dir(args), args.batch_size))


def run_probe(args) -> int:
    from trainer.workflows.evaluate import linear_probe
    if as_job(args):
        return _as_job(args, "eval-probe", "tokenizer", t=args.t, num_train=args.num_train, num_val=args.num_val,
                       pool=args.pool, epochs=args.epochs, use_ema=not args.raw)
    return print_json(linear_probe(args.checkpoint, args.overrides, args.t, args.num_train, args.num_val, args.pool,
                                   args.epochs, use_ema=not args.raw, out_dir=_out_dir(args)))
