"""Training-step throughput: the research code's path against our fastest, measured in one run.

Baseline, as the authors' code runs: fp32 (so norms and RoPE in fp32), eager, attention scores written
out, the per-tensor for-loop AdamW. Fast: bf16 autocast, compiled blocks, SDPA or flash-attn, fused
AdamW (torch's fused on CUDA; foreach on a CPU, the auto choice there). Same recipe, same seed,
same batches: the warm-up losses of the two paths must agree within bf16 tolerance, or the run fails.

Both run the trainer's own step (`rectok profile` machinery) on synthetic inputs; the data paths are
measured by benchmarks/ffcv_loader.py (FFCV vs PIL) and benchmarks/latent_loader.py (cached latents vs
online encoding). Frozen networks without weight files get random weights of the same shape.

    .venv/bin/python benchmarks/train_step.py                          # tokenizer and DiT^DH-S/B/L/XL
    .venv/bin/python benchmarks/train_step.py --models S,XL --batch 256 --steps 20
    .venv/bin/python benchmarks/train_step.py --tiny --batch 8         # the tiny recipes, seconds on a CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECIPES = {"tokenizer": "rectok/stage1_d128", "S": "dit/ditdh_s", "B": "dit/ditdh_b", "L": "dit/ditdh_l",
           "XL": "dit/ditdh_xl"}
TINY = {"tokenizer": "rectok/tiny_stage1", "T": "dit/tiny_dit"}
BASELINE = ["parallel.precision=fp32", "parallel.compile=false", "parallel.attention=math",
            "parallel.adamw=for-loop"]
FAST = ["parallel.precision=bf16", "parallel.compile=true", "parallel.attention=auto", "parallel.adamw=auto"]
LOSS_RTOL = 0.05  # bf16 keeps 8 bits of mantissa; a few steps of bf16 gradients move the loss by ~1%


def run_path(recipe: str, overrides: list[str], warmup: int, steps: int, out_dir: str) -> dict:
    from trainer.workflows.profile_steps import measure, profile_config
    cfg, _ = profile_config(recipe, overrides, out_dir)
    row = measure(cfg, warmup, steps)
    gc.collect()  # the trainer and its models go before the next path is built
    return row


def compare(name: str, recipe: str, common: list[str], baseline: list[str], fast: list[str], warmup: int,
            steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rectok-bench-") as tmp:
        base = run_path(recipe, common + baseline, warmup, steps, tmp)
        quick = run_path(recipe, common + fast, warmup, steps, tmp)
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(base["warmup_losses"], quick["warmup_losses"])]
    return {"model": name, "recipe": recipe, "baseline": base, "fast": quick,
            "ratio": quick["img_per_s"] / base["img_per_s"], "loss_max_rel_diff": max(rel) if rel else math.nan}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated: tokenizer, S, B, L, XL (default: all)")
    p.add_argument("--tiny", action="store_true", help="the tiny CPU recipes instead (tokenizer, T)")
    p.add_argument("--batch", type=int, default=2, help="global batch (one process: images per step)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps; their losses are compared")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--fast", nargs="*", default=None, help="overrides for the fast path instead of its defaults")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    table = TINY if args.tiny else RECIPES
    names = args.models.split(",") if args.models else list(table)
    common = [f"data.global_batch={args.batch}", "data.micro_batch=0", f"run.device={args.device}"]
    results = []
    for name in names:
        if name not in table:
            p.error(f"unknown model {name!r}; choose from {', '.join(table)}")
        r = compare(name, table[name], common, BASELINE, args.fast if args.fast is not None else FAST,
                    args.warmup, args.steps)
        results.append(r)
        b, f = r["baseline"], r["fast"]
        mfu = lambda row: f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"  # noqa: E731
        print(f"{name:>9}  baseline {b['img_per_s']:8.2f} img/s ({b['time/step_ms']:8.1f} ms/step, MFU {mfu(b)})  "
              f"fast {f['img_per_s']:8.2f} img/s ({f['time/step_ms']:8.1f} ms/step, MFU {mfu(f)}, "
              f"{f['kernels']['attention']}, AdamW {f['kernels']['adamw']})  ratio {r['ratio']:.2f}x  "
              f"warm-up losses within {r['loss_max_rel_diff']:.1e} (relative)", flush=True)
    device = results[0]["fast"]["device"] if results else args.device
    print(f"device {device}, global batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    bad = [r["model"] for r in results if not r["loss_max_rel_diff"] <= LOSS_RTOL]
    if bad:
        print(f"FAILED: the fast path's losses differ from the baseline's by more than {LOSS_RTOL:.0%} for "
              f"{', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
