"""Impossible combinations of config values, found before any work starts.

`validate` checks values against each other and against the world size; the files a run will read
are checked by trainer/engine/preflight.py.
"""
from __future__ import annotations

import math
import os

from models import MODELS
from models.teachers import TEACHERS

from .schema import ParallelConfig, TrainConfig, batch_split, uses_teacher
from .tree import ConfigError


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _number(value: float, key: str, low: float = 0.0, strict: bool = False) -> None:
    """A finite real >= low (> low if strict). inf and nan pass plain comparisons or slip through them
    (inf > 0), and then train on as nan weights or never-ending schedules."""
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    _check(ok, key, f"must be a finite number {'>' if strict else '>='} {low:g}, got {value}")


def _counts(counts: dict[str, int]) -> None:
    """Step, epoch and image counts, each with its least meaningful value (0 mostly means 'off' or 'all')."""
    for key, (value, least) in counts.items():
        _check(value >= least, key, f"must be >= {least}, got {value}")


def _validate_run_name(name: str) -> None:
    # The run directory is run.output_dir/run.name, and a run deletes old checkpoints in it: an absolute
    # name, "..", "." or an empty part would put it somewhere else. "/" between plain parts stays
    # inside (a sweep names its variants <sweep>/<variant>).
    parts = name.replace(os.sep, "/").split("/")
    plain = ".." not in name and all(part not in ("", ".") for part in parts)
    _check(plain, "run.name", f"{name!r} must be a folder name, or names joined by '/' (not empty, not absolute, "
                              "no '.' or '..'): the run directory is run.output_dir/run.name")


def _validate_optim(cfg: TrainConfig) -> None:
    o = cfg.optim
    _number(o.base_lr, "optim.base_lr", strict=True)
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           f"must be two numbers in [0, 1), got {list(o.betas)}")
    _number(o.eps, "optim.eps", strict=True)
    _number(o.weight_decay, "optim.weight_decay")
    _number(o.grad_clip, "optim.grad_clip")  # 0 = off


def _validate_parallel(p: ParallelConfig, world_size: int) -> None:
    _check(math.isfinite(p.timeout_min) and p.timeout_min > 0, "parallel.timeout_min",
           f"must be a positive number of minutes, got {p.timeout_min}")
    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    _check(p.replicate_degree >= 1 and world_size % p.replicate_degree == 0, "parallel.replicate_degree",
           f"{p.replicate_degree} must divide the world size {world_size}")
    _check(p.replicate_degree == 1 or p.strategy == "fsdp", "parallel.replicate_degree",
           "replica groups (HSDP) are an FSDP2 setting; use strategy fsdp")
    _number(p.gpu_memory_gb, "parallel.gpu_memory_gb")  # 0 = the device's memory


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Impossible combinations, found before any work starts."""
    m, d = cfg.model, cfg.data
    _check(m.name in MODELS, "model.name", f"unknown model {m.name!r}; registered: {', '.join(sorted(MODELS))}")
    is_dit = m.name.startswith("DiTDH")
    _check(is_dit == (cfg.task == "dit"), "model.name",
           f"{m.name} cannot be trained by task {cfg.task!r} (DiTDH-* models go with task: dit)")
    _check(m.latent_channels >= 1, "model.latent_channels", f"must be a positive integer, got {m.latent_channels}")
    _check(m.patch_size >= 1 and m.image_size % m.patch_size == 0, "model.image_size",
           f"{m.image_size} is not a multiple of model.patch_size {m.patch_size}")
    _check(d.global_batch >= 1, "data.global_batch", "must be positive")
    _check(d.global_batch % world_size == 0, "data.global_batch",
           f"{d.global_batch} is not divisible by the world size {world_size}")
    per_rank, micro = batch_split(d, world_size)
    _check(0 < micro <= per_rank and per_rank % micro == 0, "data.micro_batch",
           f"{d.micro_batch} must divide the per-rank batch {per_rank}")
    _check(d.num_workers == "auto" or d.num_workers >= 0, "data.num_workers", "must be >= 0 or auto")
    sl = cfg.slurm
    _check(sl.nodes >= 1 and sl.gpus_per_node >= 1 and sl.cpus_per_task >= 1 and sl.time_min >= 1,
           "slurm", "nodes, gpus_per_node, cpus_per_task and time_min must be >= 1")
    _check(all("=" in line for line in sl.extra_sbatch), "slurm.extra_sbatch", "entries are key=value")
    _check(0 <= sl.signal_delay_s < sl.time_min * 60, "slurm.signal_delay_s",
           f"{sl.signal_delay_s} must be >= 0 and shorter than slurm.time_min ({sl.time_min} min)")
    _check(sl.max_requeues >= 0, "slurm.max_requeues", "must be >= 0")
    # Half of a dataset would silently pair with half of the bundled default one.
    _check(cfg.task != "tokenizer" or bool(d.train) == bool(d.val), "data.train and data.val",
           f"set both or neither (got train={d.train!r}, val={d.val!r})")
    _validate_run_name(cfg.run.name)
    _validate_optim(cfg)
    s = cfg.schedule
    _check(s.epochs >= 1, "schedule.epochs", "must be >= 1")
    _check(0 <= s.warmup_epochs <= s.epochs, "schedule.warmup_epochs", f"must lie in [0, schedule.epochs={s.epochs}]")
    _number(s.min_lr, "schedule.min_lr")
    if s.kind == "constant_linear":
        _number(s.decay_start_epoch, "schedule.decay_start_epoch")
        _number(s.decay_end_epoch, "schedule.decay_end_epoch")
        _check(s.warmup_epochs <= s.decay_start_epoch < s.decay_end_epoch, "schedule.decay_start_epoch",
               f"need warmup_epochs <= decay_start_epoch < decay_end_epoch, got {s.warmup_epochs}, "
               f"{s.decay_start_epoch}, {s.decay_end_epoch}")
    _check(0 <= cfg.ema.decay < 1, "ema.decay", "must lie in [0, 1)")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _check(cfg.checkpoint.milestone_every_epochs >= 0, "checkpoint.milestone_every_epochs", "must be >= 0")
    _validate_parallel(cfg.parallel, world_size)
    _check(cfg.logging.log_every >= 1, "logging.log_every", "must be >= 1")
    _number(cfg.logging.peak_tflops, "logging.peak_tflops")  # 0 = the table of GPUs
    _counts({"run.max_steps": (cfg.run.max_steps, 0),  # 0 = the whole schedule
             "model.image_size": (m.image_size, 1),
             "data.default_per_class": (d.default_per_class, 1),
             "checkpoint.every_steps": (cfg.checkpoint.every_steps, 0),  # 0 = only at the end
             "eval.every_epochs": (cfg.eval.every_epochs, 0),  # 0 = only at the end
             "eval.num_images": (cfg.eval.num_images, 0),  # 0 = all
             "eval.grid_images": (cfg.eval.grid_images, 1),
             "eval.fid_images": (cfg.eval.fid_images, 0),  # 0 = off
             "slurm.mem_gb": (sl.mem_gb, 0)})  # 0 = the partition's default
    _validate_sample(cfg)
    if is_dit:
        _validate_dit(cfg)
    else:
        _validate_tokenizer(cfg)


def _validate_tokenizer(cfg: TrainConfig) -> None:
    m, t = cfg.model, cfg.tokenizer
    _number(t.gamma, "tokenizer.gamma")
    for name in ("rec_weight", "perceptual_weight", "kl_weight", "semantic_weight", "gan_weight",
                 "disc_start_epoch", "convnext_weight"):
        _number(getattr(cfg.loss, name), f"loss.{name}")
    _check(t.mask_ratio_min < t.mask_ratio_max < 1, "tokenizer.mask_ratio_max",
           f"need mask_ratio_min < mask_ratio_max < 1, got {t.mask_ratio_min}, {t.mask_ratio_max}")
    _check(cfg.loss.convnext_size >= 32, "loss.convnext_size",
           f"ConvNeXt-S downsamples 32x and needs at least 32 px, got {cfg.loss.convnext_size}")
    if cfg.loss.gan_weight > 0:
        _check(m.image_size >= 32, "model.image_size",
               f"the PatchGAN discriminator needs at least 32 px, got {m.image_size} (or set loss.gan_weight=0)")
    if t.stage == 2:
        _check(bool(t.init_from), "tokenizer.init_from", "stage 2 needs the stage-1 checkpoint to start from")
    if uses_teacher(cfg):
        _check(m.semantic_decoder != "none", "model.semantic_decoder",
               "is 'none' but loss.semantic_weight > 0 needs a semantic decoder")
        _check(cfg.teacher.name in TEACHERS, "teacher.name",
               f"unknown teacher {cfg.teacher.name!r}; known: {', '.join(TEACHERS)}")
        tg, grid = TEACHERS[cfg.teacher.name].grid, m.image_size // m.patch_size
        _check(tg == grid, "teacher.name",
               f"{cfg.teacher.name} gives a {tg}x{tg} token grid, the tokenizer's is {grid}x{grid}")


def _validate_dit(cfg: TrainConfig) -> None:
    x = cfg.dit
    _check(bool(x.tokenizer) or cfg.data.synthetic, "dit.tokenizer",
           "a DiT trains on the latents of a tokenizer checkpoint; set its path")
    _check(x.num_classes >= 1, "dit.num_classes", "must be >= 1")
    _check(0 <= x.label_drop < 1, "dit.label_drop", "must lie in [0, 1)")
    _number(x.time_shift, "dit.time_shift")  # 0 = automatic
    _check(x.cache_shard_size >= 1, "dit.cache_shard_size", "must be >= 1")


def _validate_sample(cfg: TrainConfig) -> None:
    p = cfg.sample
    _check(p.steps >= 2, "sample.steps", f"needs at least 2 time points, got {p.steps}")
    _check(0 <= p.interval[0] <= p.interval[1] <= 1, "sample.interval", f"need 0 <= lo <= hi <= 1, got {p.interval}")
    _check(p.batch_size >= 1, "sample.batch_size", "must be >= 1")
    _check(math.isfinite(p.scale), "sample.scale", f"must be a finite number, got {p.scale}")
    if p.guidance == "autoguidance":
        _check(bool(p.guide), "sample.guide", "AutoGuidance needs the checkpoint of the weaker guide model")
    if p.guidance == "cfg" and cfg.task == "dit":
        _check(cfg.dit.label_drop > 0, "sample.guidance",
               "CFG needs an unconditional model, but dit.label_drop is 0 so the null class was never trained")
