"""`rectok profile CONFIG [key=value ...]`: img/s, MFU, step split and memory of a recipe's training step on
this machine (synthetic data by default); --sweep, --trace, --scaling."""
from __future__ import annotations

import argparse

from . import add_recipe_arguments

EXAMPLES = """examples:
  rectok profile dit/ditdh_xl --estimate-only --gpus 8,32    # plans for CUDA on any machine, runs nothing
  rectok profile rectok/stage1_d128 --sweep batch=64,128,256 --steps 20     # one row per value
  torchrun --nproc_per_node 8 -m trainer.cli profile dit/ditdh_xl parallel.strategy=fsdp --scaling
"""

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="img/s, MFU, step split and memory of a recipe's training step on this "
                       "machine (synthetic data by default)", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EXAMPLES)
    add_recipe_arguments(p, "e.g. data.global_batch=256 parallel.compile=true")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation, allocator)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--trace", default=None, help="folder for a torch.profiler trace of --trace-steps more steps")
    p.add_argument("--trace-steps", type=int, default=3, help="--trace: steps traced")
    p.add_argument("--sweep", default=None, help="KEY=V1,V2,...: one row per value (batch = data.global_batch)")
    p.add_argument("--scaling", action="store_true", help="predicted img/s and training time on N GPUs")
    p.add_argument("--gpus", default="8,32,256", help="--scaling, --estimate-only: GPU counts")
    p.add_argument("--gpus-per-node", type=int, default=8, help="--scaling: GPUs sharing NVLink")
    p.add_argument("--intra-gbps", type=float, default=0.0, help="--scaling: all-reduce bus GB/s within a node "
                   "(default: measured on this group under torchrun, else 350)")
    p.add_argument("--inter-gbps", type=float, default=0.0, help="--scaling: all-reduce bus GB/s across nodes "
                   "(default: measured on this group under torchrun, else 40)")
    p.add_argument("--epochs", default="80,600", help="--scaling: training lengths to time")
    p.add_argument("--estimate-only", action="store_true", help="print the memory estimate per GPU and the plan "
                   "auto picks (compile, activation checkpointing, micro-batch) for each of --gpus, planned for "
                   "CUDA, and run nothing (docs/parallel.md: Memory per GPU)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(fn=run)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def run(args) -> int:
    from trainer.workflows.profile_steps import estimate_only, run_profile
    if args.estimate_only:
        print("\n".join(estimate_only(args.config, args.overrides, _ints(args.gpus))))
        return 0
    run_profile(args.config, args.overrides, args.warmup, args.steps, args.trace, args.sweep, args.scaling,
                _ints(args.gpus), args.gpus_per_node, args.intra_gbps, args.inter_gbps, _ints(args.epochs), args.json,
                args.trace_steps)
    return 0
