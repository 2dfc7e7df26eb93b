"""Pipelines: a sweep whose file lists `stages` runs each variant through them in order, e.g. tokenizer
stage 1 -> stage 2 -> latent statistics and cache -> DiT -> evaluation; `rectok sweep --status/--table/--plot`
then read the results (slurm/sweep_results.py).

    stages:
      - {name: stage1, recipe: rectok/tiny_stage1}
      - {name: cache, kind: cache-latents, recipe: dit/tiny_dit, overrides: ["dit.tokenizer={stage1}"]}
      - {name: dit, recipe: dit/tiny_dit, overrides: ["dit.tokenizer={stage1}"]}
      - {name: probe, kind: eval-probe, run: stage1, args: {epochs: 20}}

Stage S of variant V runs in SWEEP/V/S; `{S}` in a stage's overrides stands for that folder of the same
variant. On Slurm every stage is one array job over the variants, and variant i of a stage depends on
variant i of the stage before only (`--dependency=aftercorr`): a failed variant stops its own later stages
(`--kill-on-invalid-dep`), never the others'. With the local executor the stages run one after another,
the variants of a stage `max_running` at a time, and a failed variant's later stages are skipped.

Resubmitting resumes: a variant with any stage in the queue is left alone; for the others, the pipeline is
submitted from the first stage any of them has not finished, over exactly those variants (so array index i
is the same variant in every stage). A stage already finished for a variant (STAGE/done.json with the hash
of what it would run) returns at once; an unfinished training resumes from its newest complete checkpoint,
an unfinished cache keeps its shards. A pipeline whose every stage is finished submits nothing.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from data import DataError
from models.weights import MissingWeightsError
from trainer.config.recipes import dump_config, load_config
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError, doc_field, from_dict, to_dict
from trainer.engine.preemption import config_hash, read_done
from trainer.engine.preflight import check_files

from .jobs import WORKFLOWS, WorkflowJob
from .submit import TrainJob, build_executor, job_world, record_submission, write_config

log = logging.getLogger("rectok")

EVALUATIONS = ("eval-tokenizer", "eval-generator", "eval-probe")
SKIPPED = "skip"  # the kind, and the state, of a stage a variant does not run (StageConfig.only)


@dataclass
class StageConfig:
    name: str = doc_field("", "the stage's folder under its variant's (SWEEP/VARIANT/NAME); {NAME} in later "
                              "stages' overrides stands for it")
    kind: Literal["train", "cache-latents", "eval-tokenizer", "eval-generator", "eval-probe"] = doc_field(
        "train", "train a recipe, write a DiT recipe's latent statistics and cache, or evaluate an earlier stage")
    recipe: str = doc_field("", "train, cache-latents: the recipe (default: the sweep's base)")
    run: str = doc_field("", "eval-*: the name of the earlier stage whose run is evaluated")
    overrides: list[str] = doc_field([], "dotted overrides of this stage; {NAME}: stage NAME's folder of the variant")
    variant_keys: Any = doc_field(True, "train, cache-latents: which of the variant's keys this stage takes (true: "
                                        "all, false: none, or a list of keys)")
    only: list[str] = doc_field([], "run this stage only for these variants (folder names; default: all); the "
                                    "others skip it")
    otherwise: str = doc_field("", "with `only`: for a variant that skips this stage, the earlier stage whose folder "
                                   "{NAME} of this stage then stands for")
    args: Any = doc_field({}, "eval-*: the evaluation's options (num_images, t, pool, epochs, num_train, num_val, "
                              "batch, ...); cache-latents: batch_size")


@dataclass
class StageRun:
    """Stage `stage` of variant `variant`: its folder, the hash that marks it finished, the resources of its
    job (`cfg`) and the job itself."""
    stage: str
    kind: str
    variant: str
    run_dir: str
    config_hash: str
    cfg: TrainConfig
    job: Any


class SkippedStage:
    """The array task of a variant that skips its stage: array index i stays variant i in every stage."""

    def __call__(self) -> dict:
        return {"skipped": "not this variant's stage"}


class PipelineTrainJob(TrainJob):
    """A training stage: returns at once when its run already finished with this config."""

    def __init__(self, config_yaml: str, run_dir: str):
        super().__init__(config_yaml)
        self.run_dir = run_dir

    def __call__(self) -> dict:
        if (read_done(self.run_dir) or {}).get("config_hash") == config_hash(self.config_yaml):
            return {"skipped": f"{self.run_dir}: finished"}
        return super().__call__()


def read_stages(raw: list, file: str) -> list[StageConfig]:
    stages = [from_dict(StageConfig, s, f"sweep.stages[{i}].") for i, s in enumerate(raw)]
    seen: list[str] = []
    trainings: list[str] = []  # stages whose folder is a training's run in every variant, skipped or not
    for i, st in enumerate(stages):
        where = f"{file}: sweep.stages[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", st.name or ""):
            raise ConfigError(f"{where}.name: a folder name of letters, digits, _ and - ({st.name!r})")
        if st.name in seen:
            raise ConfigError(f"{where}.name: {st.name} names two stages")
        if st.kind in EVALUATIONS and st.run not in seen:
            raise ConfigError(f"{where}.run: {st.kind} evaluates an earlier stage; one of {', '.join(seen) or '(none)'}"
                              f", got {st.run!r}")
        if st.kind in EVALUATIONS and st.run not in trainings:
            ref = stages[seen.index(st.run)]
            why = f"a {ref.kind} stage" if ref.kind != "train" else f"skipped by some variants, {ref.otherwise} there"
            raise ConfigError(f"{where}.run: {st.kind} evaluates a training's run; stage {st.run} is {why}")
        if st.only and st.otherwise not in seen:
            raise ConfigError(f"{where}.otherwise: a stage only some variants run names the earlier stage that stands "
                              f"for it in the others; one of {', '.join(seen) or '(none)'}, got {st.otherwise!r}")
        if not isinstance(st.variant_keys, (bool, list)):
            raise ConfigError(f"{where}.variant_keys: true, false or a list of keys, got {st.variant_keys!r}")
        if not isinstance(st.args, dict):
            raise ConfigError(f"{where}.args: a mapping of option names to values, got {st.args!r}")
        seen.append(st.name)
        if st.kind == "train" and (not st.only or st.otherwise in trainings):
            trainings.append(st.name)
    return stages


def _substitute(text: str, runs: dict[str, StageRun], where: str) -> str:
    def one(m: re.Match) -> str:
        if m.group(1) not in runs:
            raise ConfigError(f"{where}: {{{m.group(1)}}} names no earlier stage ({', '.join(runs) or 'none'})")
        return runs[m.group(1)].run_dir
    return re.sub(r"\{([A-Za-z0-9_-]+)\}", one, text)


def _variant_overrides(st: StageConfig, entry: dict, as_override) -> list[str]:
    keys = list(entry) if st.variant_keys is True else [k for k in entry if k in (st.variant_keys or [])]
    return [as_override(k, entry[k]) for k in keys]


def resolve_variant(spec, stages: list[StageConfig], name: str, entry: dict, as_override, typed: list[str],
                    check: bool) -> list[StageRun]:
    """Every stage of one variant (its values `entry`, written as overrides by `as_override`), resolved and
    checked (files only for stages that read no earlier one's)."""
    runs: dict[str, StageRun] = {}
    for st in stages:
        where = f"variant {name}, stage {st.name}"
        if st.only and name not in st.only:  # its folder is the stage's it falls back to; its task does nothing
            instead = runs[st.otherwise]
            runs[st.name] = StageRun(st.name, SKIPPED, name, instead.run_dir, "", instead.cfg, SkippedStage())
            continue
        over = [_substitute(o, runs, where) for o in st.overrides]
        try:
            if st.kind in EVALUATIONS:
                ref = runs[st.run]
                run_dir = os.path.join(os.path.dirname(ref.run_dir), st.name)
                kwargs = {"checkpoint": ref.run_dir, "overrides": over, "out_dir": os.path.join(run_dir, "eval"),
                          "progress": False, **st.args}
                _check_arguments(st.kind, kwargs)
                digest = config_hash(json.dumps({"workflow": st.kind, **kwargs}, sort_keys=True))
                runs[st.name] = StageRun(st.name, st.kind, name, run_dir, digest, ref.cfg,
                                         WorkflowJob(st.kind, kwargs, run_dir, digest))
                continue
            full = [*spec.overrides, *_variant_overrides(st, entry, as_override), *over, *typed,
                    f"run.name={spec.name}/{name}/{st.name}"]
            cfg = load_config(st.recipe or spec.base, full)
            if st.kind == "train":
                job_world(cfg)
            elif cfg.task != "dit":
                raise ConfigError(f"cache-latents reads a DiT recipe, {st.recipe or spec.base} is a {cfg.task} one")
            if check and over == st.overrides:  # reads no earlier stage's output: its files exist now
                check_files(cfg)
        except (ConfigError, MissingWeightsError, DataError, FileNotFoundError) as e:
            raise ConfigError(f"{where}: {e}") from None
        text = dump_config(cfg)
        if st.kind == "train":
            job = PipelineTrainJob(text, cfg.run_dir)
            digest = config_hash(text)
        else:
            kwargs = {"cfg_yaml": text, **st.args}
            _check_arguments(st.kind, kwargs)
            digest = config_hash(json.dumps({"workflow": st.kind, **kwargs}, sort_keys=True))
            job = WorkflowJob(st.kind, kwargs, cfg.run_dir, digest)
        runs[st.name] = StageRun(st.name, st.kind, name, cfg.run_dir, digest, cfg, job)
    return list(runs.values())


def _check_arguments(kind: str, kwargs: dict) -> None:
    try:
        inspect.signature(WORKFLOWS[kind]).bind(**kwargs)
    except TypeError as e:
        options = [p for p in inspect.signature(WORKFLOWS[kind]).parameters if p not in ("checkpoint", "cfg_yaml")]
        raise ConfigError(f"args of a {kind} stage: {e} (its options: {', '.join(options)})") from None


def same_resources(grid: list[list[StageRun]]) -> None:
    """One array job per stage has one set of resources: every variant's stage must ask for the same."""
    for s in range(len(grid[0])):
        first = to_dict(grid[0][s].cfg.slurm)
        for runs in grid[1:]:
            other = to_dict(runs[s].cfg.slurm)
            if other != first:
                key = sorted(k for k in other if other[k] != first[k])[0]
                raise ConfigError(f"variant {runs[s].variant}, stage {runs[s].stage}: slurm.{key} differs from "
                                  f"variant {grid[0][s].variant}'s; one array job per stage has one set of resources")


def plan(grid: list[list[StageRun]], states: list[list[str]], in_queue: set[str]) -> tuple[list[int], int]:
    """The variants to submit (none of their stages in the queue, some not finished) and the first stage
    to submit them from."""
    todo, first = [], len(grid[0])
    for v, row in enumerate(states):
        if any(s in in_queue for s in row):
            continue
        unfinished = [s for s, state in enumerate(row) if state not in ("finished", SKIPPED)]
        if unfinished:
            todo.append(v)
            first = min(first, unfinished[0])
    return todo, first


def _stage_folder(sweep_folder: str, stage: str) -> str:
    return os.path.join(sweep_folder, "slurm", stage)


def _record(run: StageRun, argv: list[str], kind: str, job_id: str, sweep: str) -> None:
    if run.kind == SKIPPED:  # its folder is another stage's
        return
    if run.kind == "train":
        write_config(run.cfg)
    record_submission(run.run_dir, run.cfg.slurm.nodes * run.cfg.slurm.gpus_per_node, argv, kind, job_id,
                      sweep=sweep, variant=run.variant, stage=run.stage, config_hash=run.config_hash)


def submit_on_slurm(grid: list[list[StageRun]], todo: list[int], first: int, sweep: str, folder: str, argv: list[str],
                    limit: int) -> dict[tuple[int, int], str]:
    """Stages first.. as array jobs over `todo`, each after the one before task by task; (variant, stage)
    -> job id."""
    ids, previous = {}, None
    for s in range(first, len(grid[0])):
        runs = [grid[v][s] for v in todo]
        ex = build_executor(runs[0].cfg, "slurm", _stage_folder(folder, runs[0].stage), limit,
                            after=f"aftercorr:{previous}" if previous else None)
        ex.update_parameters(name=f"rectok-{sweep}-{runs[0].stage}")
        with ex.batch():
            jobs = [ex.submit(run.job) for run in runs]
        for v, run, job in zip(todo, runs, jobs):
            ids[v, s] = str(job.job_id)
            _record(run, argv, "slurm", str(job.job_id), sweep)
        previous = str(jobs[0].job_id).split("_")[0]
        log.info("stage %s: array job %s over %d variant(s)%s", runs[0].stage, previous, len(runs),
                 f", each after its variant's {grid[0][s - 1].stage}" if s > first else "")
    return ids


def run_locally(grid: list[list[StageRun]], todo: list[int], first: int, sweep: str, folder: str, argv: list[str],
                limit: int) -> dict[tuple[int, int], str]:
    """Stages first.. one after another as local processes, `limit` variants at a time (0: all); a failed
    variant's later stages are skipped. Returns (variant, stage) -> job id, or 'failed: ...' / 'skipped'."""
    ids: dict[tuple[int, int], str] = {}
    failed: dict[int, str] = {}
    for s in range(first, len(grid[0])):
        alive = [v for v in todo if v not in failed]
        for v in todo:
            if v in failed:
                ids[v, s] = f"skipped (stage {failed[v]} failed)"
        step = limit or len(alive) or 1
        for i in range(0, len(alive), step):
            chunk = alive[i:i + step]
            jobs = []
            for v in [v for v in chunk if grid[v][s].kind == SKIPPED]:
                ids[v, s] = SKIPPED
            chunk = [v for v in chunk if grid[v][s].kind != SKIPPED]
            for v in chunk:
                run = grid[v][s]
                ex = build_executor(run.cfg, "local", _stage_folder(folder, run.stage))
                jobs.append(ex.submit(run.job))
                _record(run, argv, "local", str(jobs[-1].job_id), sweep)
            for v, job in zip(chunk, jobs):
                run = grid[v][s]
                try:
                    job.result()
                    ids[v, s] = str(job.job_id)
                    print(f"  {run.variant} / {run.stage}: done", flush=True)
                except Exception as e:  # the job's own error, with its log file; the other variants go on
                    failed[v] = run.stage
                    ids[v, s] = f"failed: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else e!r}"
                    print(f"  {run.variant} / {run.stage}: FAILED ({ids[v, s]}); logs in "
                          f"{_stage_folder(folder, run.stage)}", flush=True)
    return ids
