"""`rectok sweep SWEEP --status / --table / --plot`: a sweep read from what its submission resolved.

A submission of a sweep (one that submits something, or finds nothing left to submit; never a dry run)
writes `SWEEP_DIR/sweep.json` (slurm/sweep.py's `write_resolution`): the sweep's name, its swept keys and,
per variant, its swept values, overrides, absolute run directory and config hash, with the command line
and time of the submission. Status, table and plot read that file: they need neither the weight files,
nor the working directory the sweep was submitted from, nor the overrides typed then (the stored config
hashes say whether a run's done.json is the run submitted). SWEEP is the sweep folder itself, or the
sweep file (a path or a bundled name), which is resolved only as far as the folder (no file checks).
A sweep never submitted falls back to the variants as the sweep file resolves now, and says so.

The final metrics of a variant: the last value of each evaluation tracked in training (metrics.jsonl,
then done.json's final evaluation), overridden by the results of the evaluation commands in
RUN/eval/eval_*.json (`rectok eval tokenizer|generator|probe`).
"""
from __future__ import annotations

import csv
import fnmatch
import glob
import io
import json
import os

from data.files import write_text
from trainer.config.recipes import find_recipe
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError, apply_overrides, from_dict, read_yaml
from trainer.engine.preemption import read_done
from trainer.engine.tracking import read_metrics
from trainer.evaluation.pictures import metric_curves, metrics_against
from trainer.workflows.report import eval_keys

from .pipeline import SKIPPED
from .sweep import (
    RESOLUTION,
    as_override,
    load_pipeline,
    load_sweep,
    pipeline_resolution,
    read_sweep_file,
    resolution,
    run_status,
    short_value,
    stage_status,
    variant_values,
)

RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
# Final-metric columns: a title and the result keys the column may show. Per sweep, the first pattern
# any variant has is the column's source for every variant (one protocol down a column): the evaluation
# commands' numbers (eval_tokenizer.json: rfid_ema, psnr_ema; eval_generator.json: gfid, sfid,
# class_accuracy; eval_probe.json: top1_clean, top1_t<t>) before the ones tracked in training.
FINAL_METRICS = {
    "rfid": ("rFID", ("rfid_ema", "eval/rfid*")),
    "psnr": ("PSNR (dB)", ("psnr_ema", "eval/psnr_ema")),
    "gfid": ("gFID", ("gfid", "eval/gfid*")),
    "sfid": ("sFID", ("sfid",)),
    "class_acc": ("class accuracy of samples", ("class_accuracy", "eval/class_accuracy")),
    "probe_clean": ("probe top-1, clean latents", ("top1_clean",)),
    "probe_xt": ("probe top-1, x_t", ("top1_t*",)),
    "eval_loss": ("eval loss (EMA)", ("eval/loss_ema",)),
}


def sweep_location(path: str, overrides: list[str] = ()) -> str:
    """The sweep folder a sweep file names (its first variant's run.output_dir / the sweep's name), read
    from the files alone: no validation, no file checks."""
    _, spec = read_sweep_file(path)
    over = [*spec.overrides, *(as_override(k, v) for k, v in variant_values(spec.variants[0]).items()), *overrides]
    first = spec.stages[0] if spec.stages and isinstance(spec.stages[0], dict) else {}
    try:
        cfg = from_dict(TrainConfig, apply_overrides(read_yaml(find_recipe(first.get("recipe") or spec.base)), over))
    except ConfigError as e:  # a base recipe given relative to the submission's working directory
        raise ConfigError(f"{e} (a sweep submitted from elsewhere: pass its folder, output_dir/{spec.name})") from None
    return os.path.abspath(os.path.join(cfg.run.output_dir, spec.name))


def read_resolution(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def open_resolution(path: str, overrides: list[str] = ()) -> tuple[dict, str | None]:
    """The resolution of the sweep `path` (sweep folder, its sweep.json, or the sweep file) and a note
    when there is none stored (the sweep was never submitted): then the variants as resolved now."""
    if os.path.isdir(path):
        stored = os.path.join(path, RESOLUTION)
        if not os.path.isfile(stored):
            raise ConfigError(f"{path}: a folder without {RESOLUTION}; a sweep's folder gets one when the sweep "
                              f"is submitted (or pass the sweep file)")
        return read_resolution(stored), None
    if os.path.basename(path) == RESOLUTION and os.path.isfile(path):
        return read_resolution(path), None
    stored = os.path.join(sweep_location(path, overrides), RESOLUTION)
    if os.path.isfile(stored):
        return read_resolution(stored), None
    if read_sweep_file(path)[1].stages:
        spec, file, grid = load_pipeline(path, list(overrides), check=False)
        res = pipeline_resolution(spec, grid, file)
    else:
        spec, variants = load_sweep(path, list(overrides), check=False)
        res = resolution(spec, variants, find_recipe(path))
    note = (f"note: sweep {spec.name} was never submitted to {os.path.dirname(stored)} (no {RESOLUTION} there; "
            f"submitted from another working directory or with another run.output_dir? pass its folder); "
            f"its variants as the sweep file resolves now:")
    return res, note


def _numbers(record: dict, prefix: str = "") -> dict:
    return {k: v for k, v in record.items() if k.startswith(prefix) and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def run_results(run_dir: str) -> dict:
    """A run's numbers: the last value of each evaluation tracked in training (metrics.jsonl, then the
    final one in done.json), then the evaluation commands' results in RUN/eval/eval_*.json, which win."""
    out = {}
    for record in read_metrics(run_dir, missing_ok=True):
        out.update(_numbers(record, "eval/"))
    done = read_done(run_dir)
    if done and isinstance(done.get("metrics"), dict):
        out.update(_numbers(done["metrics"], "eval/"))
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "eval_*.json"))):
        try:
            with open(path) as f:
                out.update(_numbers(json.load(f)))
        except (OSError, ValueError):
            continue
    return out


def final_columns(results: list[dict]) -> dict[str, str]:
    """Final-metric column -> the result key it shows (FINAL_METRICS), for the columns some variant has."""
    out = {}
    for column, (_, patterns) in FINAL_METRICS.items():
        for pattern in patterns:
            keys = sorted({k for r in results for k in r if fnmatch.fnmatchcase(k, pattern)})
            if keys:
                out[column] = keys[0]
                break
    return out


def sweep_results(res: dict) -> tuple[list[dict], dict[str, str]]:
    """One row per variant of a resolution (state, step, run directory, job id as slurm/sweep.py's
    `run_status`, its swept values, all its results and its final metrics) and the final-metric columns."""
    variants = res["variants"]
    if res.get("stages"):
        rows = [pipeline_row(v) for v in variants]
    else:
        rows = run_status([(v["name"], v["run_dir"], v["config_hash"]) for v in variants])
        for row, v in zip(rows, variants):
            row["results"] = run_results(v["run_dir"])
            row["curves"] = {v["name"]: v["run_dir"]}
    for row, v in zip(rows, variants):
        row["values"] = v.get("values", {})
    columns = final_columns([row["results"] for row in rows])
    for row in rows:
        row["final"] = {c: row["results"].get(key) for c, key in columns.items()}
    return rows, columns


def pipeline_row(variant: dict) -> dict:
    """A pipeline variant's row: each stage's state, the variant's state (finished, or its first unfinished
    stage's), the step of that stage, and the results of all its stages (a later stage's win)."""
    stages = stage_status([(s["name"], s["kind"], s["run_dir"], s["config_hash"]) for s in variant["stages"]])
    pending = [r for r in stages if r["state"] not in ("finished", SKIPPED)]
    results = {}
    for s in variant["stages"]:
        results.update(run_results(s["run_dir"]))
    now = pending[0] if pending else stages[-1]
    return {"variant": variant["name"], "state": f"{now['variant']}: {now['state']}" if pending else "finished",
            "step": now["step"], "metrics": now["metrics"], "run_dir": variant["run_dir"], "job_id": now["job_id"],
            "stages": {r["variant"]: r["state"] for r in stages}, "results": results,
            "curves": {f"{variant['name']} / {s['name']}": s["run_dir"] for s in variant["stages"]
                       if s["kind"] == "train"}}


def sweep_axis(res: dict) -> tuple[str, list]:
    """The plots' x: the first swept key when its values tell the variants apart (numbers stay numbers),
    else the variants' names, in the variants' order."""
    variants = res["variants"]
    for key in res.get("keys", [])[:1]:
        xs = [v.get("values", {}).get(key) for v in variants]
        if None not in xs and len({json.dumps(x) for x in xs}) == len(xs):
            return key, [x if isinstance(x, (int, float)) and not isinstance(x, bool) else short_value(x) for x in xs]
    return "variant", [v["name"] for v in variants]


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_results(rows: list[dict], columns: dict[str, str]) -> str:
    """The status table: variant, state, step, the final metrics some variant has, run directory."""
    stages = list(rows[0].get("stages", {})) if rows else []
    head = ["variant", *stages, *([] if stages else ["state", "step"]), *columns, "run dir"]
    body = [[r["variant"], *(r["stages"][s] for s in stages), *([] if stages else [r["state"], str(r["step"])]),
             *(_cell(r["final"][c]) for c in columns), r["run_dir"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])


def write_tables(res: dict, rows: list[dict], columns: dict[str, str]) -> dict:
    """SWEEP_DIR/results.csv (swept keys, variant, final metrics at full precision, state, step, run
    directory) and SWEEP_DIR/results.md (swept keys, final metrics to 4 digits, state); one row per variant."""
    if not columns:
        raise ConfigError(f"sweep {res['sweep']}: no variant has a result yet (no evaluation tracked in training, "
                          f"no RUN/eval/eval_*.json; run directories under {res['dir']})")
    keys = list(res.get("keys", []))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*keys, "variant", *columns, "state", "step", "run_dir"])
    for r in rows:
        writer.writerow([*(r["values"].get(k) for k in keys), r["variant"],
                         *("" if r["final"][c] is None else repr(r["final"][c]) for c in columns),
                         r["state"], r["step"], r["run_dir"]])
    csv_path = write_text(os.path.join(res["dir"], RESULTS_CSV), text.getvalue())
    # The variant's name too where its swept values do not tell it apart (named variants, stage switches).
    named = not keys or len({json.dumps([r["values"].get(k) for k in keys]) for r in rows}) < len(rows)
    head = [*(["variant"] if named else []), *keys, *(FINAL_METRICS[c][0] for c in columns), "state"]
    lines = [f"Sweep `{res['sweep']}`: final metrics per variant", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        cells = [*([r["variant"]] if named else []), *(_cell(r["values"].get(k)) for k in keys),
                 *(_cell(r["final"][c]) for c in columns), r["state"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Sources: " + "; ".join(f"{FINAL_METRICS[c][0]} = `{key}`" for c, key in columns.items()) + "."]
    if res.get("submitted"):
        lines.append(f"Resolved at submission {res['submitted']}: `{res.get('command', '')}`.")
    md_path = write_text(os.path.join(res["dir"], RESULTS_MD), "\n".join(lines) + "\n")
    return {"csv": csv_path, "markdown": md_path, "columns": columns, "rows": len(rows)}


def plot_sweep(res: dict, rows: list[dict], columns: dict[str, str], out: str) -> dict:
    """A sweep read from its resolution (`res`, its rows and final-metric columns):
    each final metric against the swept setting (numbers on a numeric axis, else the variants in order),
    and the tracked evaluation of every variant against epochs, as PNGs in `out` (the sweep folder's
    pictures/)."""
    name = res["sweep"]
    x_key, xs = sweep_axis(res)
    panels = {f"{FINAL_METRICS[c][0]} ({key})": [r["final"][c] for r in rows] for c, key in columns.items()}
    files = {}
    if panels:
        files["metrics_against"] = metrics_against(xs, panels, x_key, os.path.join(out, "sweep_metrics.png"),
                                                   f"Sweep {name}: final metrics")
    records = {label: read_metrics(run_dir, missing_ok=True) for r in rows for label, run_dir in r["curves"].items()}
    keys = eval_keys([r for rs in records.values() for r in rs])
    if keys:
        files["metrics_curves"] = metric_curves(records, keys, os.path.join(out, "sweep_curves.png"),
                                                f"Sweep {name}: tracked evaluation")
    if not files:
        raise ConfigError(f"sweep {name}: no variant has a result yet (no evaluation tracked in training, no "
                          f"RUN/eval/eval_*.json; run directories under {res['dir']})")
    return {"sweep": name, "x": x_key, "values": xs, "columns": columns,
            "final": {r["variant"]: r["final"] for r in rows}, "results": {r["variant"]: r["results"] for r in rows},
            **files}
