"""The one typed config tree. Defaults are the paper's stage-1 recipe at C = 128 (SPEC 1.10)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

import yaml

from .config_tree import (ConfigError, apply_overrides, doc_field, field_docs, from_dict, read_yaml,
                          to_dict)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


@dataclass
class RunConfig:
    name: str = doc_field("rectok_stage1", "run name; the run directory is output_dir/name")
    output_dir: str = doc_field("runs", "parent directory of run directories")
    seed: int = doc_field(0, "global seed (model init, data order, noise)")
    device: Literal["auto", "cpu", "cuda"] = doc_field("auto", "auto picks cuda when available")
    max_steps: int = doc_field(0, "stop after this many optimizer steps (0 = run the whole schedule)")


@dataclass
class ModelConfig:
    name: str = doc_field("RecTok-BB", "registered model name (models.MODELS)")
    latent_channels: int = doc_field(128, "latent channels C (16, 32, 64 or 128 in the paper)")
    image_size: int = doc_field(256, "training resolution in pixels")
    patch_size: int = doc_field(16, "encoder patch size; the latent grid is image_size / patch_size")
    semantic_decoder: Literal["transformer", "mlp", "none"] = doc_field(
        "transformer", "semantic decoder kind (mlp for the ablations)")


@dataclass
class TeacherConfig:
    name: str = doc_field("dinov3-l16", "frozen teacher (models.teachers.TEACHERS)")
    weights: Optional[str] = doc_field(None, "local weights file of the teacher, or 'random' for tests")


@dataclass
class DataConfig:
    loader: Literal["ffcv", "pil"] = doc_field(
        "ffcv", "ffcv: .beton files from `rectok data write-ffcv`; pil: image files decoded by PIL (fallback)")
    train: Optional[str] = doc_field(
        None, "training split: a .beton (ffcv) or a class folder / list file (pil); unset: the default dataset")
    val: Optional[str] = doc_field(None, "validation split, as data.train")
    ffcv_os_cache: bool = doc_field(True, "ffcv: read through the OS page cache (shared by the ranks of a node)")
    default_dataset_dir: str = doc_field("~/.cache/rectok/datasets", "where the bundled default dataset is generated")
    default_per_class: int = doc_field(256, "training images per class when the default dataset is generated")
    global_batch: int = doc_field(1024, "images per optimizer step over all ranks")
    micro_batch: int = doc_field(0, "images per rank per forward pass (0 = global_batch / world size)")
    num_workers: int = doc_field(8, "loader workers per rank: FFCV decoding threads, or PIL DataLoader processes")
    hflip: bool = doc_field(True, "random horizontal flip in training (drawn on the device from the step's seed)")
    synthetic: bool = doc_field(False, "random inputs of the training shapes, ImageNet's length: no dataset, "
                                "tokenizer checkpoint or stage-1 weights are read (`rectok profile`)")


@dataclass
class OptimConfig:
    base_lr: float = doc_field(1e-4, "learning rate per 256 images; lr = base_lr * global_batch / 256")
    betas: tuple[float, float] = doc_field((0.9, 0.95), "AdamW betas")
    eps: float = doc_field(1e-8, "AdamW epsilon")
    weight_decay: float = doc_field(1e-4, "AdamW weight decay (not on 1-D params, embeddings, mask tokens)")
    grad_clip: float = doc_field(3.0, "global gradient-norm clip (0 = off)")


@dataclass
class ScheduleConfig:
    epochs: int = doc_field(200, "training length in epochs")
    warmup_epochs: float = doc_field(50, "linear warm-up from 0, in epochs")
    min_lr: float = doc_field(0.0, "learning rate at the end of the cosine")
    kind: Literal["cosine", "constant_linear"] = doc_field(
        "cosine", "after warm-up: cosine to min_lr at the end, or constant then linear (the DiT recipe)")
    decay_start_epoch: float = doc_field(40, "constant_linear: epoch at which the linear decay starts")
    decay_end_epoch: float = doc_field(800, "constant_linear: epoch at which lr reaches min_lr (may lie past the run)")


@dataclass
class EMAConfig:
    decay: float = doc_field(0.999, "EMA decay per optimizer step, from initialisation")


@dataclass
class LossConfig:
    rec_weight: float = doc_field(1.0, "pixel MSE weight")
    perceptual_weight: float = doc_field(1.0, "(LPIPS + 0.1 ConvNeXt) / 1.1 weight")
    kl_weight: float = doc_field(1e-6, "KL weight")
    semantic_weight: float = doc_field(1.0, "semantic (1 - cos) distillation weight")
    gan_weight: float = doc_field(0.1, "generator adversarial weight (the released runs' effective 0.1)")
    disc_start_epoch: float = doc_field(100, "epoch at which the discriminator and GAN term start")
    lpips_vgg_weights: Optional[str] = doc_field(None, "torchvision VGG16 weights file for LPIPS, or 'random'")
    convnext_weights: Optional[str] = doc_field(None, "torchvision ConvNeXt-S weights file, or 'random'")
    convnext_weight: float = doc_field(0.1, "weight of the ConvNeXt logit MSE inside the perceptual loss")
    convnext_size: int = doc_field(224, "resolution fed to ConvNeXt-S")


@dataclass
class TokenizerConfig:
    stage: Literal[1, 2] = doc_field(1, "1 = pretraining with FSD + RAD, 2 = pixel-decoder fine-tuning")
    gamma: float = doc_field(1.0, "FSD noise scale gamma (0 = no noising)")
    t_schedule: Literal["shift", "uniform", "lognorm"] = doc_field("shift", "FSD time distribution")
    mask_ratio_min: float = doc_field(-0.1, "RAD mask ratio r = max(0, U(min, max))")
    mask_ratio_max: float = doc_field(0.4, "upper bound of the RAD mask-ratio draw")
    init_from: Optional[str] = doc_field(None, "checkpoint (run dir or file) whose weights start this stage")
    init_use_ema: bool = doc_field(True, "start from the EMA weights of init_from")


@dataclass
class DiTConfig:
    tokenizer: Optional[str] = doc_field(None, "tokenizer checkpoint (run dir, checkpoint dir or state file) making the latents")
    tokenizer_use_ema: bool = doc_field(True, "use the tokenizer's EMA weights")
    latents: Literal["cache", "online"] = doc_field("cache", "read a latent cache, or encode images on the fly")
    cache_dir: Optional[str] = doc_field(None, "latent cache directory (unset: latent_cache/ beside the tokenizer checkpoint)")
    cache_shard_size: int = doc_field(4096, "images per cache shard")
    stats: Optional[str] = doc_field(None, "latent statistics file (unset: latent_stats.json beside the tokenizer checkpoint)")
    num_classes: int = doc_field(1000, "class labels; the label table has one more row, the null class")
    label_drop: float = doc_field(0.1, "probability of replacing a label by the null class in training")
    time_shift: float = doc_field(0.0, "time shift s (0 = sqrt(N*C/4096), never below 1)")
    init_from: Optional[str] = doc_field(None, "DiT checkpoint (run or checkpoint dir) whose weights start this run: "
                                         "fine-tuning, with a fresh optimizer")
    init_use_ema: bool = doc_field(True, "start from the EMA weights of init_from")


@dataclass
class SampleConfig:
    steps: int = doc_field(150, "time points K of the Euler grid (K - 1 steps; 50 for ablations)")
    guidance: Literal["none", "cfg", "autoguidance"] = doc_field("none", "guidance kind")
    scale: float = doc_field(1.0, "guidance weight w (1 = no guidance)")
    interval: tuple[float, float] = doc_field((0.0, 1.0), "guide only while t lies in [lo, hi] (t = 0 noise, 1 data)")
    guide: Optional[str] = doc_field(None, "AutoGuidance: checkpoint of the weaker ('bad') DiT")
    guide_use_ema: bool = doc_field(True, "AutoGuidance: use the guide's EMA weights")
    seed: int = doc_field(0, "image i uses noise seeded by (seed, i): the same images for any batch size")
    batch_size: int = doc_field(64, "images per sampling forward pass")


@dataclass
class ParallelConfig:
    strategy: Literal["ddp", "fsdp", "deepspeed"] = doc_field(
        "ddp", "ddp (replicated), fsdp (FSDP2 sharding, HSDP with replicate_degree > 1) or deepspeed (ZeRO)")
    zero_stage: int = doc_field(2, "DeepSpeed ZeRO stage (1: optimizer state, 2: + gradients, 3: + parameters)")
    replicate_degree: int = doc_field(1, "FSDP2: replica groups (HSDP); shards = world size / replicate_degree")
    reshard_after_forward: bool = doc_field(True, "FSDP2: free gathered parameters after forward (less memory, "
                                            "one more all-gather in backward)")
    activation_checkpointing: bool = doc_field(False, "recompute each transformer block in backward (less memory)")
    compile: bool = doc_field(False, "torch.compile each transformer block")
    precision: Literal["auto", "bf16", "fp32"] = doc_field("auto", "autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    attention: Literal["auto", "flash", "sdpa", "math"] = doc_field(
        "auto", "attention kernel: auto = flash-attn when installed with CUDA kernels and the head dims fit, else "
        "SDPA; math = scores written out (the benchmarks' baseline)")
    adamw: Literal["auto", "apex", "fused", "foreach", "for-loop"] = doc_field(
        "auto", "AdamW kernel: auto = torch fused on CUDA, else foreach; apex only when asked; for-loop = per tensor")


@dataclass
class CheckpointConfig:
    every_steps: int = doc_field(2000, "save every N optimizer steps (0 = only at the end)")
    keep_last: int = doc_field(3, "complete checkpoints kept (older ones are deleted)")
    milestone_every_epochs: int = doc_field(0, "also save at every N-th epoch and keep those forever (0 = none)")
    resume: bool = doc_field(True, "resume from the newest complete checkpoint in the run directory")


@dataclass
class SlurmConfig:
    executor: Literal["auto", "slurm", "local"] = doc_field(
        "auto", "rectok submit: Slurm when sbatch is on PATH, else local processes (auto), or forced")
    nodes: int = doc_field(4, "nodes per job")
    gpus_per_node: int = doc_field(8, "GPUs per node; one rank per GPU (the local executor: ranks on this machine)")
    cpus_per_task: int = doc_field(12, "CPU cores per rank (data loading threads and the main process)")
    mem_gb: int = doc_field(0, "memory per node in GB (0 = the partition's default)")
    partition: Optional[str] = doc_field(None, "Slurm partition")
    account: Optional[str] = doc_field(None, "Slurm account")
    qos: Optional[str] = doc_field(None, "Slurm QoS")
    constraint: Optional[str] = doc_field(None, "Slurm node constraint (e.g. h100)")
    time_min: int = doc_field(4320, "job time limit in minutes; a longer run checkpoints, requeues and goes on")
    signal_delay_s: int = doc_field(120, "Slurm sends the checkpoint signal (USR2) this long before the time limit")
    max_requeues: int = doc_field(50, "requeues of one job after checkpoint signals before it gives up")
    extra_sbatch: list[str] = doc_field([], "extra '#SBATCH' options as key=value (e.g. exclusive=, gres=gpu:8)")
    job_name: Optional[str] = doc_field(None, "Slurm job name (unset: rectok-<run.name>)")


@dataclass
class LoggingConfig:
    log_every: int = doc_field(20, "print and record metrics every N steps")
    progress: bool = doc_field(True, "show a progress bar")
    tensorboard: bool = doc_field(True, "also write the metrics for TensorBoard (RUN/tensorboard); metrics.jsonl always")
    wandb: bool = doc_field(False, "also log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = doc_field("rectok", "wandb project")
    wandb_mode: Literal["online", "offline"] = doc_field("online", "offline: no network; `wandb sync` uploads later")
    peak_tflops: float = doc_field(0.0, "device peak TFLOP/s for MFU (0 = trainer.throughput's table of GPUs)")


@dataclass
class EvalConfig:
    every_epochs: int = doc_field(10, "evaluate every N epochs (0 = only at the end): tokenizer PSNR and "
                                  "reconstructions, DiT fixed-noise loss and samples")
    num_images: int = doc_field(1000, "images used (tokenizer: validation images; DiT: training latents); 0 = all")
    grid_images: int = doc_field(16, "images in the picture (reconstructions or samples), spread over the classes")
    at_start: bool = doc_field(False, "also evaluate before the first step of a fresh run (a 'before' picture)")
    fid_images: int = doc_field(10000, "images of the FID tracked at every evaluation (DiT: gFID of EMA samples; tokenizer: "
                                "rFID of EMA reconstructions of validation images spread over the classes); 0 = off")
    inception_weights: str = doc_field("weights/pt_inception-2015-12-05-6726825d.pth",
                                       "torch-fidelity's FID Inception-v3 weights (a local file; 'random' in tests)")
    reference: str = doc_field("weights/VIRTUAL_imagenet256_labeled.npz",
                               "FID reference statistics (.npz with mu, sigma: ADM's file or `rectok eval ref-stats`)")


@dataclass
class TrainConfig:
    task: Literal["tokenizer", "dit"] = doc_field("tokenizer", "what is trained: the RecTok tokenizer or a DiT^DH")
    run: RunConfig = doc_field(RunConfig(), "run identity")
    model: ModelConfig = doc_field(ModelConfig(), "model")
    teacher: TeacherConfig = doc_field(TeacherConfig(), "semantic teacher")
    data: DataConfig = doc_field(DataConfig(), "data")
    optim: OptimConfig = doc_field(OptimConfig(), "optimiser (generator and discriminator)")
    schedule: ScheduleConfig = doc_field(ScheduleConfig(), "learning-rate schedule")
    ema: EMAConfig = doc_field(EMAConfig(), "EMA")
    loss: LossConfig = doc_field(LossConfig(), "loss weights and frozen loss networks")
    tokenizer: TokenizerConfig = doc_field(TokenizerConfig(), "tokenizer stage, FSD and RAD")
    dit: DiTConfig = doc_field(DiTConfig(), "DiT^DH latents and rectified-flow training")
    sample: SampleConfig = doc_field(SampleConfig(), "sampling (evaluation grids and rectok sample)")
    parallel: ParallelConfig = doc_field(ParallelConfig(), "parallelism and precision")
    checkpoint: CheckpointConfig = doc_field(CheckpointConfig(), "checkpointing")
    slurm: SlurmConfig = doc_field(SlurmConfig(), "cluster resources for `rectok submit`")
    logging: LoggingConfig = doc_field(LoggingConfig(), "logging")
    eval: EvalConfig = doc_field(EvalConfig(), "evaluation during training")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.output_dir, self.run.name)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def batch_split(d: DataConfig, world_size: int) -> tuple[int, int]:
    """(images per rank per step, images per rank per forward pass) for this world size."""
    per_rank = d.global_batch // world_size
    return per_rank, d.micro_batch or per_rank


def _validate_parallel(p: ParallelConfig, world_size: int) -> None:
    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    _check(p.replicate_degree >= 1 and world_size % p.replicate_degree == 0, "parallel.replicate_degree",
           f"{p.replicate_degree} must divide the world size {world_size}")
    _check(p.replicate_degree == 1 or p.strategy == "fsdp", "parallel.replicate_degree",
           "replica groups (HSDP) are an FSDP2 setting; use strategy fsdp")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Impossible combinations, found before any work starts."""
    from models import MODELS

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
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
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
    _check(cfg.optim.base_lr > 0, "optim.base_lr", "must be positive")
    _check(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    s = cfg.schedule
    _check(s.epochs >= 1, "schedule.epochs", "must be >= 1")
    _check(0 <= s.warmup_epochs <= s.epochs, "schedule.warmup_epochs", f"must lie in [0, schedule.epochs={s.epochs}]")
    if s.kind == "constant_linear":
        _check(s.warmup_epochs <= s.decay_start_epoch < s.decay_end_epoch, "schedule.decay_start_epoch",
               f"need warmup_epochs <= decay_start_epoch < decay_end_epoch, got {s.warmup_epochs}, "
               f"{s.decay_start_epoch}, {s.decay_end_epoch}")
    _check(0 <= cfg.ema.decay < 1, "ema.decay", "must lie in [0, 1)")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _check(cfg.checkpoint.milestone_every_epochs >= 0, "checkpoint.milestone_every_epochs", "must be >= 0")
    _validate_parallel(cfg.parallel, world_size)
    _check(cfg.logging.log_every >= 1, "logging.log_every", "must be >= 1")
    _validate_sample(cfg)
    if is_dit:
        _validate_dit(cfg)
    else:
        _validate_tokenizer(cfg)


def _validate_tokenizer(cfg: TrainConfig) -> None:
    from models.teachers import TEACHERS
    m, t = cfg.model, cfg.tokenizer
    _check(t.gamma >= 0, "tokenizer.gamma", "must be >= 0")
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
    _check(x.time_shift >= 0, "dit.time_shift", "must be >= 0 (0 = automatic)")
    _check(x.cache_shard_size >= 1, "dit.cache_shard_size", "must be >= 1")


def _validate_sample(cfg: TrainConfig) -> None:
    p = cfg.sample
    _check(p.steps >= 2, "sample.steps", f"needs at least 2 time points, got {p.steps}")
    _check(0 <= p.interval[0] <= p.interval[1] <= 1, "sample.interval", f"need 0 <= lo <= hi <= 1, got {p.interval}")
    _check(p.batch_size >= 1, "sample.batch_size", "must be >= 1")
    if p.guidance == "autoguidance":
        _check(bool(p.guide), "sample.guide", "AutoGuidance needs the checkpoint of the weaker guide model")
    if p.guidance == "cfg" and cfg.task == "dit":
        _check(cfg.dit.label_drop > 0, "sample.guidance",
               "CFG needs an unconditional model, but dit.label_drop is 0 so the null class was never trained")


def check_files(cfg: TrainConfig) -> None:
    """Every local file the run will read exists: a missing one fails now, not after set-up."""
    from models.weights import require_weights

    from .checkpoint import resolve_checkpoint
    wanted, checkpoints = [], []
    if cfg.task == "tokenizer":
        if uses_teacher(cfg):
            wanted.append(("teacher.weights", cfg.teacher.weights))
        if cfg.loss.perceptual_weight > 0:
            wanted.append(("loss.lpips_vgg_weights", cfg.loss.lpips_vgg_weights))
            if cfg.loss.convnext_weight > 0:
                wanted.append(("loss.convnext_weights", cfg.loss.convnext_weights))
        if cfg.tokenizer.stage == 2 and not cfg.data.synthetic:
            checkpoints.append(("tokenizer.init_from", cfg.tokenizer.init_from))
    elif not cfg.data.synthetic:
        checkpoints.append(("dit.tokenizer", cfg.dit.tokenizer))
        if cfg.dit.init_from:
            checkpoints.append(("dit.init_from", cfg.dit.init_from))
    if cfg.sample.guidance == "autoguidance":
        checkpoints.append(("sample.guide", cfg.sample.guide))
    for key, path in wanted:
        require_weights(path, key.split(".")[0], key)
    for key, path in checkpoints:
        try:
            resolve_checkpoint(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{key}: {e}") from None
    reads_images = not cfg.data.synthetic and (cfg.task == "tokenizer" or cfg.dit.latents == "online")
    for split in ("train", "val"):
        path = getattr(cfg.data, split)
        if path and not cfg.data.synthetic and not os.path.exists(path):
            raise FileNotFoundError(f"data.{split}: dataset not found: {path}")
    if cfg.eval.fid_images:  # FID tracking during training (eval.fid_images = 0 turns it off)
        require_weights(cfg.eval.inception_weights, "Inception-v3 (FID)", "eval.inception_weights")
        if not os.path.isfile(cfg.eval.reference):
            raise FileNotFoundError(f"eval.reference: FID reference statistics not found: {cfg.eval.reference} "
                                    f"(`rectok eval ref-stats` writes them; eval.fid_images=0 turns FID tracking off)")
    if reads_images and cfg.data.loader == "ffcv":
        from data.ffcv_loader import require_ffcv
        require_ffcv()


def uses_teacher(cfg: TrainConfig) -> bool:
    return cfg.task == "tokenizer" and cfg.tokenizer.stage == 1 and cfg.loss.semantic_weight > 0


def find_recipe(path: str) -> str:
    """A file path, or a bundled recipe name such as `rectok/tiny_stage1`."""
    if os.path.isfile(path):
        return path
    for cand in (os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, path + ".yaml")):
        if os.path.isfile(cand):
            return cand
    raise ConfigError(f"config file not found: {path} (nor under {CONFIG_DIR})")


def load_config(path: str | None, overrides: list[str] = (), world_size: int = 1) -> TrainConfig:
    """YAML recipe + dotted overrides -> validated TrainConfig (the one place configs are resolved)."""
    data = read_yaml(find_recipe(path)) if path else {}
    cfg = from_dict(TrainConfig, apply_overrides(data, list(overrides)))
    validate(cfg, world_size)
    return cfg


def parse_saved_config(text: str) -> TrainConfig:
    """The resolved config stored inside a checkpoint (no validation: it was validated when saved)."""
    return from_dict(TrainConfig, yaml.safe_load(text))


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_docs() -> str:
    return "\n".join(f"{k} ({tp}, default {default!r}): {doc}" for k, tp, default, doc in field_docs(TrainConfig))
