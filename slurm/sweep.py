"""`rectok sweep SWEEP.yaml`: the variants of a base recipe as one Slurm array job.

A sweep file names a base recipe, overrides shared by every variant, and the variants (mappings of
dotted keys to values). Each variant trains in `output_dir/<sweep>/<variant>`, the variant's name
built from its overrides (`latent_channels=16`). A variant is finished when its run directory holds
`done.json` with the hash of the same resolved config (trainer/engine/preemption.py); resubmitting a sweep
submits only the variants that are neither finished nor in the queue, and those resume from their
newest checkpoint. One array job has one set of resources, so every variant must ask for the same
`slurm.*`. Each submission (not a dry run) writes what it resolved to `output_dir/<sweep>/sweep.json`,
from which `--status`, `--table` and `--plot` read the sweep (slurm/sweep_results.py).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

from data import DataError
from data.files import write_json
from models.weights import MissingWeightsError
from trainer.config.recipes import dump_config, find_recipe, load_config
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError, doc_field, from_dict, read_yaml, to_dict
from trainer.engine.checkpoint import list_complete
from trainer.engine.preemption import config_hash, read_done
from trainer.engine.preflight import check_files
from trainer.engine.tracking import METRICS

from .pipeline import SKIPPED, plan, read_stages, resolve_variant, run_locally, same_resources, submit_on_slurm
from .submit import (
    SUBMISSIONS,
    TrainJob,
    build_executor,
    git_commit,
    job_world,
    record_submission,
    resolve_executor,
    write_config,
)

# squeue states in which a variant is still the queue's business: resubmitting it would train twice.
IN_QUEUE = {"pending", "running", "requeued", "configuring", "completing", "suspended", "resizing",
            "requeue_hold", "requeue_fed", "signaling", "stage_out"}
RESOLUTION = "sweep.json"  # SWEEP_DIR/sweep.json: what the newest submission resolved (slurm/sweep_results.py)


@dataclass
class SweepConfig:
    base: str = doc_field("", "the recipe every variant starts from (a path or a bundled name)")
    name: str = doc_field("", "the sweep's folder under run.output_dir (default: the sweep file's name)")
    overrides: list[str] = doc_field([], "dotted key=value overrides shared by every variant")
    variants: list[Any] = doc_field([], "one mapping of dotted keys to values per variant (and optionally `name`: "
                                        "its folder)")
    name_keys: list[str] = doc_field([], "the keys whose values name a variant's folder (default: all of its keys)")
    max_running: int = doc_field(0, "array tasks running at once (0 = no limit); locally: variants at once")
    stages: list[Any] = doc_field([], "a pipeline: the stages every variant runs in order (slurm/pipeline.py); "
                                      "none: one training of `base`")


@dataclass
class Variant:
    name: str
    overrides: list[str]
    cfg: TrainConfig
    config_hash: str


def as_override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def short_value(value) -> str:
    """A setting as a folder name or a tick label shows it: a path by its file's stem."""
    text = os.path.splitext(os.path.basename(value))[0] if isinstance(value, str) and "/" in value else str(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def variant_name(variant: dict, name_keys: list[str]) -> str:
    """A variant's folder: its `name` when it has one, else its values of the name keys (`latent_channels=16`)."""
    if "name" in variant:
        return short_value(variant["name"])
    keys = [k for k in (name_keys or variant) if k in variant]
    return ",".join(f"{k.rsplit('.', 1)[-1]}={short_value(variant[k])}" for k in keys) or "base"


def variant_values(variant: dict) -> dict:
    """A variant's settings: its dotted keys, without its `name` (config keys are always dotted)."""
    return {k: v for k, v in variant.items() if k != "name"}


def read_sweep_file(path: str) -> tuple[str, SweepConfig]:
    """The sweep file's path and its checked contents (no variant resolved)."""
    file = find_recipe(path)
    spec = from_dict(SweepConfig, read_yaml(file), "sweep.")
    spec.name = spec.name or os.path.splitext(os.path.basename(file))[0]
    if not spec.variants or not all(isinstance(v, dict) and v for v in spec.variants):
        raise ConfigError(f"{file}: sweep.variants must be a non-empty list of mappings of dotted keys to values")
    if spec.max_running < 0:
        raise ConfigError("sweep.max_running: must be >= 0")
    if not spec.base and not spec.stages:
        raise ConfigError(f"{file}: sweep.base is required (the recipe the variants start from; or sweep.stages: "
                          f"a pipeline)")
    return file, spec


def load_sweep(path: str, overrides: list[str] = (), check: bool = True) -> tuple[SweepConfig, list[Variant]]:
    """Every variant resolved and validated (config, job world and, with `check`, the local files it
    reads); nothing is written."""
    file, spec = read_sweep_file(path)
    if spec.stages:
        raise ConfigError(f"{file}: a pipeline (sweep.stages); read it with load_pipeline")
    variants = []
    for entry in spec.variants:
        name = variant_name(entry, spec.name_keys)
        # Command-line overrides come last: what is typed wins over the file.
        over = [*spec.overrides, *(as_override(k, v) for k, v in variant_values(entry).items()), *overrides,
                f"run.name={spec.name}/{name}"]
        try:
            cfg = load_config(spec.base, over)
            job_world(cfg)
            if check:
                check_files(cfg)
        except (ConfigError, MissingWeightsError, DataError, FileNotFoundError) as e:
            raise ConfigError(f"variant {name}: {e}") from None
        variants.append(Variant(name, over, cfg, config_hash(dump_config(cfg))))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{file}: two variants share a folder name ({', '.join(names)}); set sweep.name_keys "
                          f"to keys that tell them apart")
    first = to_dict(variants[0].cfg.slurm)
    for v in variants[1:]:
        if to_dict(v.cfg.slurm) != first:
            diff = sorted(k for k, val in to_dict(v.cfg.slurm).items() if first[k] != val)
            raise ConfigError(f"variant {v.name}: slurm.{diff[0]} differs from variant {variants[0].name}'s; one "
                              f"array job has one set of resources (submit such variants as separate sweeps)")
    return spec, variants


def sweep_dir(spec: SweepConfig, variants: list[Variant]) -> str:
    return os.path.join(variants[0].cfg.run.output_dir, spec.name)


def swept_keys(spec: SweepConfig) -> list[str]:
    """The keys a sweep varies: its name_keys, else every key of its variants in order of appearance."""
    return list(spec.name_keys) or list(dict.fromkeys(k for entry in spec.variants for k in variant_values(entry)))


def _setting(cfg: TrainConfig, entry: dict, key: str):
    node = to_dict(cfg)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return entry.get(key)
        node = node[part]
    return node


def resolution(spec: SweepConfig, variants: list[Variant], file: str) -> dict:
    """What a sweep resolves to: name, folder, swept keys, and per variant its swept values, overrides,
    absolute run directory and config hash (all paths absolute: read from anywhere)."""
    keys = swept_keys(spec)
    return {"sweep": spec.name, "dir": os.path.abspath(sweep_dir(spec, variants)), "file": os.path.abspath(file),
            "base": spec.base, "keys": keys,
            "variants": [{"name": v.name, "values": {k: _setting(v.cfg, entry, k) for k in keys},
                          "overrides": v.overrides, "run_dir": os.path.abspath(v.cfg.run_dir),
                          "config_hash": v.config_hash} for v, entry in zip(variants, spec.variants)]}


def write_resolution(res: dict, argv: list[str], overrides: list[str], kind: str, rows: list[dict] | None) -> str:
    """SWEEP_DIR/sweep.json, written whole: the resolution with the submission's command line, typed
    overrides, executor, time, and each variant's action and job id (`rows`; a pipeline's are in its
    stages already) (the newest submission wins)."""
    out = {**res, "command": shlex.join(["rectok", *argv]), "overrides": list(overrides), "executor": kind,
           "submitted": res.get("submitted") or datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "git_commit": git_commit()}
    if rows is not None:
        out["variants"] = [{**v, "action": row["action"], "job_id": row["job_id"]}
                           for v, row in zip(res["variants"], rows)]
    return write_json(os.path.join(res["dir"], RESOLUTION), out)


def load_pipeline(path: str, overrides: list[str] = (), check: bool = True) -> tuple[SweepConfig, str, list]:
    """A pipeline sweep resolved: the spec, its file, and per variant its stages (slurm/pipeline.py's
    StageRun), all checked; nothing is written."""
    file, spec = read_sweep_file(path)
    stages = read_stages(spec.stages, file)
    grid = []
    for entry in spec.variants:
        name = variant_name(entry, spec.name_keys)
        grid.append(resolve_variant(spec, stages, name, variant_values(entry), as_override, list(overrides), check))
    names = [runs[0].variant for runs in grid]
    if len(set(names)) != len(names):
        raise ConfigError(f"{file}: two variants share a folder name ({', '.join(names)}); set sweep.name_keys "
                          f"to keys that tell them apart")
    for st in stages:
        if set(st.only) - set(names):
            raise ConfigError(f"{file}: stage {st.name}: only: {sorted(set(st.only) - set(names))[0]} is no variant's "
                              f"folder name ({', '.join(names)})")
    same_resources(grid)
    return spec, file, grid


def pipeline_resolution(spec: SweepConfig, grid: list, file: str) -> dict:
    """As `resolution`, for a pipeline: per variant its folder and, per stage, kind, folder and hash."""
    keys = swept_keys(spec)
    folder = os.path.abspath(os.path.join(grid[0][0].cfg.run.output_dir, spec.name))
    return {"sweep": spec.name, "dir": folder, "file": os.path.abspath(file), "base": spec.base, "keys": keys,
            "stages": [r.stage for r in grid[0]],
            "variants": [{"name": runs[0].variant, "values": {k: _setting(runs[0].cfg, entry, k) for k in keys},
                          "run_dir": os.path.join(folder, runs[0].variant),
                          "stages": [{"name": r.stage, "kind": r.kind, "run_dir": os.path.abspath(r.run_dir),
                                      "config_hash": r.config_hash} for r in runs]}
                         for runs, entry in zip(grid, spec.variants)]}


def submit_pipeline(path: str, overrides: list[str], argv: list[str], dry_run: bool = False,
                    max_running: int | None = None, executor: str | None = None) -> dict:
    """Submit a pipeline's unfinished stages (slurm/pipeline.py), on Slurm as dependent array jobs, locally
    stage by stage to the end; sweep.json is written before anything runs and again after."""
    typed = list(overrides) + ([f"slurm.executor={executor}"] if executor else [])
    spec, file, grid = load_pipeline(path, typed)
    kind = resolve_executor(grid[0][0].cfg)
    status = [stage_status([(r.stage, r.kind, r.run_dir, r.config_hash) for r in runs]) for runs in grid]
    todo, first = plan(grid, [[row["state"] for row in rows] for rows in status], IN_QUEUE)
    res = pipeline_resolution(spec, grid, file)
    rows = []
    for v, (runs, st_rows, entry) in enumerate(zip(grid, status, res["variants"])):
        for s, (run, row, stage) in enumerate(zip(runs, st_rows, entry["stages"])):
            row["variant"] = f"{run.variant} / {run.stage}"
            row["action"] = stage["action"] = "submit" if v in todo and s >= first and run.kind != SKIPPED else "skip"
            stage["job_id"] = row["job_id"]
            rows.append(row)
    out = {"sweep": spec.name, "dir": res["dir"], "executor": kind, "variants": rows, "job_ids": []}
    if dry_run:
        return out
    res["submitted"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")  # kept by the rewrite
    out["resolution"] = write_resolution(res, argv, overrides, kind, None)
    if not todo:
        return out
    limit = spec.max_running if max_running is None else max_running
    ids = (submit_on_slurm if kind == "slurm" else run_locally)(grid, todo, first, spec.name, res["dir"], argv, limit)
    for (v, s), job_id in ids.items():
        res["variants"][v]["stages"][s]["job_id"] = job_id
        row = rows[v * len(grid[0]) + s]
        ran = job_id[0].isdigit()  # else a local run's "failed: ..." or "skipped (...)"
        row["job_id"], row["state"] = job_id, ("submitted" if kind == "slurm" else "ran" if ran else job_id)
    out["job_ids"] = [j for j in ids.values() if j[0].isdigit()]
    out["resolution"] = write_resolution(res, argv, overrides, kind, None)
    return out


def _last_submission(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, SUBMISSIONS)) as f:
            lines = [line for line in f if line.strip()]
    except FileNotFoundError:
        return None
    return json.loads(lines[-1]) if lines else None


def _last_metrics(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, METRICS), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))  # the tail is enough; the file grows long
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def queue_states(submissions: list[dict]) -> dict[str, str]:
    """job id -> state (lower case) for jobs the scheduler still knows; absent ones are gone from it."""
    states = {}
    slurm_ids = [s["job_id"] for s in submissions if s["executor"] == "slurm"]
    if slurm_ids:
        try:
            out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(slurm_ids)],
                                 capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        for line in out.splitlines():
            job_id, _, state = line.strip().partition("|")
            states[job_id] = state.lower()
    for s in submissions:
        if s["executor"] == "local":  # the local executor's job id is its controller's pid
            try:
                os.kill(int(s["job_id"]), 0)
                states[s["job_id"]] = "running"
            except (OSError, ValueError):
                pass
    return states


def variant_status(variants: list[Variant]) -> list[dict]:
    """One row per variant: state, step, last metrics, run directory, job id."""
    return run_status([(v.name, v.cfg.run_dir, v.config_hash) for v in variants])


def run_status(entries: list[tuple[str, str, str]]) -> list[dict]:
    """One row per (variant, run directory, config hash): state, step, last metrics, run directory, job id."""
    subs = {name: _last_submission(run_dir) for name, run_dir, _ in entries}
    states = queue_states([s for s in subs.values() if s])
    rows = []
    for name, run_dir, wanted in entries:
        sub = subs[name]
        done, metrics = read_done(run_dir), _last_metrics(run_dir)
        queued = states.get(sub["job_id"]) if sub else None
        saved = list_complete(run_dir)  # (step, directory), oldest first
        if done and done["config_hash"] == wanted:
            state = "finished"
        elif queued in IN_QUEUE:
            state = queued
        elif done:
            state = "finished, other config"
        elif sub is None:
            state = "not submitted"
        else:  # left the queue unfinished: failed, cancelled, or stopped at the requeue bound
            state = (queued or "stopped") + (" (resumable)" if saved else "")
        step = done.get("step", 0) if state == "finished" else metrics.get("step", saved[-1][0] if saved else 0)
        rows.append({"variant": name, "state": state, "step": step, "metrics": metrics,
                     "run_dir": run_dir, "job_id": sub["job_id"] if sub else None})
    return rows


def stage_status(stages: list[tuple[str, str, str, str]]) -> list[dict]:
    """As `run_status` for a pipeline variant's stages (name, kind, run directory, hash); a stage the variant
    skips reads as skipped."""
    rows = iter(run_status([(n, d, h) for n, kind, d, h in stages if kind != SKIPPED]))
    return [{"variant": n, "state": SKIPPED, "step": 0, "metrics": {}, "run_dir": d, "job_id": None}
            if kind == SKIPPED else next(rows) for n, kind, d, h in stages]


def submit_sweep(path: str, overrides: list[str], argv: list[str], dry_run: bool = False,
                 max_running: int | None = None, executor: str | None = None) -> dict:
    """Submit the unfinished variants not in the queue as one array job (nothing for a dry run); a real
    submission, also one with nothing left to submit, writes what it resolved to SWEEP_DIR/sweep.json."""
    if read_sweep_file(path)[1].stages:
        return submit_pipeline(path, overrides, argv, dry_run, max_running, executor)
    spec, variants = load_sweep(path, list(overrides) + ([f"slurm.executor={executor}"] if executor else []))
    kind = resolve_executor(variants[0].cfg)
    rows = variant_status(variants)
    todo = [v for v, row in zip(variants, rows)
            if row["state"] != "finished" and row["state"] not in IN_QUEUE]
    for row in rows:
        row["action"] = "submit" if any(v.name == row["variant"] for v in todo) else "skip"
    out = {"sweep": spec.name, "dir": sweep_dir(spec, variants), "executor": kind, "variants": rows, "job_ids": []}
    if dry_run:
        return out
    res = resolution(spec, variants, find_recipe(path))
    if not todo:
        out["resolution"] = write_resolution(res, argv, overrides, kind, rows)
        return out
    limit = spec.max_running if max_running is None else max_running
    ex = build_executor(variants[0].cfg, kind, os.path.join(out["dir"], "slurm"), limit)
    ex.update_parameters(name=variants[0].cfg.slurm.job_name or f"rectok-{spec.name}")
    configs = [write_config(v.cfg) for v in todo]
    with ex.batch():
        jobs = [ex.submit(TrainJob(text)) for text in configs]
    for v, job, row in zip(todo, jobs, (r for r in rows if r["action"] == "submit")):
        record_submission(v.cfg.run_dir, job_world(v.cfg), argv, kind, str(job.job_id), sweep=spec.name,
                          variant=v.name, config_hash=v.config_hash)
        row["job_id"], row["state"] = str(job.job_id), "submitted"
    out["job_ids"] = [str(j.job_id) for j in jobs]
    out["jobs"] = jobs
    out["resolution"] = write_resolution(res, argv, overrides, kind, rows)
    return out


def format_table(rows: list[dict], action: bool = False) -> str:
    """The status table: variant, state, step, a few of the last metrics, run directory."""
    def brief(m: dict) -> str:  # the total loss, then evaluation numbers, then the loss terms
        keys = sorted((k for k in m if k not in ("step", "epoch", "lr", "img_per_s") and not k.startswith("grad_norm")
                       and isinstance(m[k], (int, float))), key=lambda k: (k != "total", not k.startswith("eval/")))
        return " ".join(f"{k}={m[k]:.4g}" for k in keys[:4]) or "-"
    head = ["variant", "state", *(["action"] if action else []), "step", "last metrics", "run dir"]
    body = [[r["variant"], r["state"], *([r["action"]] if action else []), str(r["step"]), brief(r["metrics"]),
             r["run_dir"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])
