"""`rectok sweep SWEEP [key=value ...]`: the variants of a sweep file as one Slurm array job; --status,
--dry-run, --plot."""
from __future__ import annotations

import argparse
import os

from . import print_json

EXAMPLES = """examples:
  rectok sweep sweeps/latent_dims --dry-run   # resolve and check all four variants; submit nothing
  rectok sweep sweeps/latent_dims --status    # state, step, last metrics, run directory per variant
  rectok sweep sweeps/latent_dims --plot      # a sweep's metrics against C
"""

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="the variants of a sweep file as one Slurm array job; --status, --dry-run",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("sweep", help="sweep YAML path or bundled name (e.g. sweeps/latent_dims)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    p.add_argument("--status", action="store_true", help="print each variant's state, step, metrics and run dir")
    p.add_argument("--dry-run", action="store_true", help="resolve and validate every variant; submit nothing")
    p.add_argument("--max-running", type=int, default=None, help="array tasks at once (default: the file's)")
    p.add_argument("--local", action="store_true", help="run as local processes even where Slurm is")
    p.add_argument("--plot", action="store_true", help="PNGs of the variants' metrics against the sweep's setting "
                   "and of their tracked evaluation against epochs, in the sweep folder")
    p.set_defaults(fn=run)


def run(args) -> int:
    from slurm.sweep import format_table, load_sweep, submit_sweep, sweep_dir, variant_status
    from trainer.workflows.report import PICTURES, sweep_report
    if args.plot:
        spec, variants = load_sweep(args.sweep, args.overrides, check=False)
        x_key = (spec.name_keys or list(spec.variants[0]))[0]
        out = os.path.join(sweep_dir(spec, variants), PICTURES)
        return print_json(sweep_report(spec.name, x_key, [(v.name, v.cfg) for v in variants], out))
    if args.status:
        spec, variants = load_sweep(args.sweep, args.overrides)
        print(f"sweep {spec.name}: {len(variants)} variants")
        print(format_table(variant_status(variants)))
        return 0
    out = submit_sweep(args.sweep, args.overrides, args.argv, args.dry_run, args.max_running,
                       "local" if args.local else None)
    submitted = sum(r["action"] == "submit" for r in out["variants"])
    verb = "would submit" if args.dry_run else "submitted"
    print(f"sweep {out['sweep']} ({out['executor']}): {verb} {submitted} of {len(out['variants'])} variants"
          + (f" as job {out['job_ids'][0].split('_')[0]}" if out["job_ids"] and out["executor"] == "slurm" else ""))
    print(format_table(out["variants"], action=True))
    return 0
