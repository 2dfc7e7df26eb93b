"""`rectok sweep SWEEP.yaml`: the variants of a base recipe as one Slurm array job.

A sweep file names a base recipe, overrides shared by every variant, and the variants (mappings of
dotted keys to values). Each variant trains in `output_dir/<sweep>/<variant>`, the variant's name
built from its overrides (`latent_channels=16`). A variant is finished when its run directory holds
`done.json` with the hash of the same resolved config (trainer/engine/preemption.py); resubmitting a sweep
submits only the variants that are neither finished nor in the queue, and those resume from their
newest checkpoint. One array job has one set of resources, so every variant must ask for the same
`slurm.*`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

from data import DataError
from models.weights import MissingWeightsError
from trainer.config.recipes import dump_config, find_recipe, load_config
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError, doc_field, from_dict, read_yaml, to_dict
from trainer.engine.checkpoint import list_complete
from trainer.engine.preemption import config_hash, read_done
from trainer.engine.preflight import check_files
from trainer.engine.tracking import METRICS

from .submit import SUBMISSIONS, TrainJob, build_executor, job_world, record_submission, resolve_executor, write_config

# squeue states in which a variant is still the queue's business: resubmitting it would train twice.
IN_QUEUE = {"pending", "running", "requeued", "configuring", "completing", "suspended", "resizing",
            "requeue_hold", "requeue_fed", "signaling", "stage_out"}


@dataclass
class SweepConfig:
    base: str = doc_field("", "the recipe every variant starts from (a path or a bundled name)")
    name: str = doc_field("", "the sweep's folder under run.output_dir (default: the sweep file's name)")
    overrides: list[str] = doc_field([], "dotted key=value overrides shared by every variant")
    variants: list[Any] = doc_field([], "one mapping of dotted keys to values per variant")
    name_keys: list[str] = doc_field([], "the keys whose values name a variant's folder (default: all of its keys)")
    max_running: int = doc_field(0, "array tasks running at once (0 = no limit; Slurm only)")


@dataclass
class Variant:
    name: str
    overrides: list[str]
    cfg: TrainConfig
    config_hash: str


def _as_override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def variant_name(variant: dict, name_keys: list[str]) -> str:
    def short(value) -> str:
        text = os.path.splitext(os.path.basename(value))[0] if isinstance(value, str) and "/" in value else str(value)
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    keys = [k for k in (name_keys or variant) if k in variant]
    return ",".join(f"{k.rsplit('.', 1)[-1]}={short(variant[k])}" for k in keys) or "base"


def load_sweep(path: str, overrides: list[str] = (), check: bool = True) -> tuple[SweepConfig, list[Variant]]:
    """Every variant resolved and validated (config, job world and, with `check`, the local files it
    reads); nothing is written."""
    file = find_recipe(path)
    spec = from_dict(SweepConfig, read_yaml(file), "sweep.")
    spec.name = spec.name or os.path.splitext(os.path.basename(file))[0]
    if not spec.base:
        raise ConfigError(f"{file}: sweep.base is required (the recipe the variants start from)")
    if not spec.variants or not all(isinstance(v, dict) and v for v in spec.variants):
        raise ConfigError(f"{file}: sweep.variants must be a non-empty list of mappings of dotted keys to values")
    if spec.max_running < 0:
        raise ConfigError("sweep.max_running: must be >= 0")
    variants = []
    for entry in spec.variants:
        name = variant_name(entry, spec.name_keys)
        # Command-line overrides come last: what is typed wins over the file.
        over = [*spec.overrides, *(_as_override(k, v) for k, v in entry.items()), *overrides,
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
    subs = {v.name: _last_submission(v.cfg.run_dir) for v in variants}
    states = queue_states([s for s in subs.values() if s])
    rows = []
    for v in variants:
        run_dir, sub = v.cfg.run_dir, subs[v.name]
        done, metrics = read_done(run_dir), _last_metrics(run_dir)
        queued = states.get(sub["job_id"]) if sub else None
        saved = list_complete(run_dir)  # (step, directory), oldest first
        if done and done["config_hash"] == v.config_hash:
            state = "finished"
        elif queued in IN_QUEUE:
            state = queued
        elif done:
            state = "finished, other config"
        elif sub is None:
            state = "not submitted"
        else:  # left the queue unfinished: failed, cancelled, or stopped at the requeue bound
            state = (queued or "stopped") + (" (resumable)" if saved else "")
        step = done["step"] if state == "finished" else metrics.get("step", saved[-1][0] if saved else 0)
        rows.append({"variant": v.name, "state": state, "step": step, "metrics": metrics,
                     "run_dir": run_dir, "job_id": sub["job_id"] if sub else None})
    return rows


def submit_sweep(path: str, overrides: list[str], argv: list[str], dry_run: bool = False,
                 max_running: int | None = None, executor: str | None = None) -> dict:
    """Submit the unfinished variants not in the queue as one array job (nothing for a dry run)."""
    spec, variants = load_sweep(path, list(overrides) + ([f"slurm.executor={executor}"] if executor else []))
    kind = resolve_executor(variants[0].cfg)
    rows = variant_status(variants)
    todo = [v for v, row in zip(variants, rows)
            if row["state"] != "finished" and row["state"] not in IN_QUEUE]
    for row in rows:
        row["action"] = "submit" if any(v.name == row["variant"] for v in todo) else "skip"
    out = {"sweep": spec.name, "dir": sweep_dir(spec, variants), "executor": kind, "variants": rows, "job_ids": []}
    if dry_run or not todo:
        return out
    limit = spec.max_running if max_running is None else max_running
    ex = build_executor(variants[0].cfg, kind, os.path.join(out["dir"], "slurm"), limit)
    ex.update_parameters(name=variants[0].cfg.slurm.job_name or f"rectok-{spec.name}")
    configs = [write_config(v.cfg) for v in todo]
    with ex.batch():
        jobs = [ex.submit(TrainJob(text)) for text in configs]
    for v, job, row in zip(todo, jobs, (r for r in rows if r["action"] == "submit")):
        record_submission(v.cfg, argv, kind, str(job.job_id), sweep=spec.name, variant=v.name,
                          config_hash=v.config_hash)
        row["job_id"], row["state"] = str(job.job_id), "submitted"
    out["job_ids"] = [str(j.job_id) for j in jobs]
    out["jobs"] = jobs
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
