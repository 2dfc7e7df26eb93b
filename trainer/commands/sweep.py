"""`rectok sweep SWEEP [key=value ...]`: the variants of a sweep file as one Slurm array job; --dry-run,
and --status, --table, --plot read what the submission resolved (SWEEP_DIR/sweep.json)."""
from __future__ import annotations

import argparse
import os

from . import print_json

EXAMPLES = """examples:
  rectok sweep sweeps/latent_dims --dry-run   # resolve and check all four variants; submit nothing
  rectok sweep sweeps/latent_dims             # submit what is neither finished nor queued; writes sweep.json
  rectok sweep sweeps/latent_dims --status    # state, step, final metrics (rFID, PSNR, gFID, probe), run dir
  rectok sweep runs/latent_dims --status      # the same from the sweep folder, from any working directory
  rectok sweep sweeps/latent_dims --table     # results.csv and results.md of the final metrics per variant
  rectok sweep sweeps/latent_dims --plot      # each final metric against C, and tracked evaluation per epoch
  rectok sweep sweeps/tiny_latent_dims --local   # a pipeline (stages), run here stage by stage
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="the variants of a sweep file as one Slurm array job; --status, --table, "
                       "--plot, --dry-run", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("sweep", help="sweep YAML path or bundled name (e.g. sweeps/latent_dims); for --status, --table "
                                 "and --plot also the sweep's folder (output_dir/<sweep>)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant (--status, --table and "
                                                "--plot need none: they read what the submission resolved)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="print each variant's state, step, final metrics and "
                      "run dir, as resolved at submission (no weight files needed)")
    what.add_argument("--table", action="store_true", help="write the final metrics per variant as results.csv and "
                      "results.md in the sweep folder")
    what.add_argument("--plot", action="store_true", help="PNGs of each final metric against the swept setting and "
                      "of the tracked evaluation against epochs, in the sweep folder's pictures/")
    what.add_argument("--dry-run", action="store_true", help="resolve and validate every variant; submit nothing")
    p.add_argument("--max-running", type=int, default=None, help="array tasks at once (default: the file's)")
    p.add_argument("--local", action="store_true", help="run as local processes even where Slurm is")
    p.set_defaults(fn=run)


def run(args) -> int:
    if args.status or args.table or args.plot:
        return results(args)
    from slurm.sweep import format_table, submit_sweep
    out = submit_sweep(args.sweep, args.overrides, args.argv, args.dry_run, args.max_running,
                       "local" if args.local else None)
    submitted = sum(r["action"] == "submit" for r in out["variants"])
    verb = "would submit" if args.dry_run else "submitted"
    what = "stages of variants" if " / " in out["variants"][0]["variant"] else "variants"
    jobs = list(dict.fromkeys(j.split("_")[0] for j in out["job_ids"])) if out["executor"] == "slurm" else []
    print(f"sweep {out['sweep']} ({out['executor']}): {verb} {submitted} of {len(out['variants'])} {what}"
          + (f" as job{'s' * (len(jobs) > 1)} {', '.join(jobs)}" if jobs else ""))
    print(format_table(out["variants"], action=True))
    return 0


def results(args) -> int:
    from slurm.sweep_results import format_results, open_resolution, plot_sweep, sweep_results, write_tables
    from trainer.workflows.report import PICTURES
    res, note = open_resolution(args.sweep, args.overrides)
    rows, columns = sweep_results(res)
    if args.status:
        if note:
            print(note)
        when = f", as resolved at submission {res['submitted']} ({res['command']})" if res.get("submitted") else ""
        print(f"sweep {res['sweep']}: {len(rows)} variants{when}")
        print(format_results(rows, columns))
        return 0
    out = {"sweep": res["sweep"], "dir": res["dir"], **({"note": note} if note else {})}
    if args.table:
        return print_json({**out, **write_tables(res, rows, columns)})
    return print_json({**out, **plot_sweep(res, rows, columns, os.path.join(res["dir"], PICTURES))})
