"""Everything that is not a training, as a submitit job: `cache-latents`, `eval tokenizer|generator|probe` and
`sample` with the resources of `rectok submit` (slurm.*, --nodes, --gpus-per-node, ...), on Slurm or as local
processes, and the non-training stages of a pipeline (slurm/pipeline.py).

Every task of the job learns its rank from submitit's environment as a training's does, so the evaluations
split their images over the ranks exactly as under torchrun. A job is submitit-checkpointable: a preemption
or the checkpoint signal (USR2) requeues it, and the requeued job starts the workflow again, which resumes:
the latent cache keeps its finished shards, and the sample evaluations keep the Inception features of the
images already featurised (trainer/evaluation/fidelity.py, `resume`). A job given a stage folder writes
FOLDER/done.json with the stage's hash when it ends, and returns at once when that file is already there.
"""
from __future__ import annotations

import logging
import os
import time

import submitit
import torch.distributed as dist

from data.files import write_json
from trainer.config.recipes import parse_saved_config
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError
from trainer.engine.distributed import barrier, env_from_launcher, join_process_group
from trainer.engine.preemption import read_done
from trainer.engine.tracking import configure_logging
from trainer.tasks.latents import cache_latents, tokenizer_and_stats
from trainer.tasks.sampling import sample_from_checkpoint
from trainer.workflows.evaluate import evaluate_generator, evaluate_tokenizer, linear_probe

from .submit import build_executor, record_submission, resolve_executor

log = logging.getLogger("rectok")


def _cache(cfg_yaml: str, batch_size: int = 64) -> dict:
    """The statistics on rank 0 first (the others would compute the same), then the shards split over the
    ranks, then rank 0 marks the cache complete once every shard is in place."""
    cfg = parse_saved_config(cfg_yaml)
    env = env_from_launcher()
    device = join_process_group(env, cfg.run.device)
    if env.main:
        tokenizer_and_stats(cfg, device)
    barrier()
    out = cache_latents(cfg, device, batch_size, env.rank, env.world)
    barrier()
    if env.main and not out["complete"]:
        out = cache_latents(cfg, device, batch_size, 0, 1)  # every shard is there: only marks it complete
    return out


def _sample(checkpoint: str, overrides: list[str], out_dir: str, num_images: int, use_ema: bool = True) -> dict:
    """Samples written by rank 0 (`rectok sample` is one process; the evaluation of samples is what splits
    over ranks: eval-generator)."""
    if not env_from_launcher().main:
        return {}
    out = sample_from_checkpoint(checkpoint, overrides, out_dir, num_images, use_ema=use_ema)
    return {k: v for k, v in out.items() if k not in ("images", "labels")}


# What a job may run: name -> the function its keyword arguments go to.
WORKFLOWS = {"cache-latents": _cache, "eval-tokenizer": evaluate_tokenizer, "eval-generator": evaluate_generator,
             "eval-probe": linear_probe, "sample": _sample}


class WorkflowJob(submitit.helpers.Checkpointable):
    """One workflow with its keyword arguments on every task of the job; with `stage_dir`, a stage of a
    pipeline: skipped when STAGE_DIR/done.json holds `stage_hash`, and that file written at the end."""

    def __init__(self, workflow: str, kwargs: dict, stage_dir: str | None = None, stage_hash: str | None = None):
        if workflow not in WORKFLOWS:
            raise ConfigError(f"unknown workflow {workflow!r}; one of {', '.join(WORKFLOWS)}")
        self.workflow, self.kwargs, self.stage_dir, self.stage_hash = workflow, kwargs, stage_dir, stage_hash

    def __call__(self) -> dict:
        if self.stage_dir and (read_done(self.stage_dir) or {}).get("config_hash") == self.stage_hash:
            return {"skipped": f"{self.stage_dir}: finished"}
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        env = env_from_launcher()
        configure_logging(env.main)
        t0 = time.time()
        try:
            out = WORKFLOWS[self.workflow](**self.kwargs)
            barrier()  # every rank's share is written before the stage reads as finished
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if env.main and self.stage_dir:
            write_json(os.path.join(self.stage_dir, "done.json"),
                       {"config_hash": self.stage_hash, "workflow": self.workflow, "result": _plain(out),
                        "seconds": round(time.time() - t0, 1), "time": time.time()})
        return out


def _plain(out: dict) -> dict:
    return {k: v for k, v in out.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def submit_workflow(cfg: TrainConfig, workflow: str, kwargs: dict, folder: str, argv: list[str]):
    """`workflow(**kwargs)` as one job with `cfg`'s resources (slurm.*); submitit's files and a line in
    submissions.jsonl go to `folder`. Returns the submitit job."""
    kind = resolve_executor(cfg)
    os.makedirs(folder, exist_ok=True)
    ex = build_executor(cfg, kind, os.path.join(folder, "slurm"))
    ex.update_parameters(name=cfg.slurm.job_name or f"rectok-{workflow}")
    job = ex.submit(WorkflowJob(workflow, kwargs))
    record_submission(folder, cfg.slurm.nodes * cfg.slurm.gpus_per_node, argv, kind, str(job.job_id),
                      workflow=workflow)
    log.info("%s submitted as job %s (%s); logs in %s", workflow, job.job_id, kind, os.path.join(folder, "slurm"))
    return job
