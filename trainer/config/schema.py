"""The one typed config tree: every key a run reads, its type, its default and its meaning.

Defaults are the paper's stage-1 tokenizer recipe at C = 128 (docs/reference.md §1.10); the recipes in
configs/ change what differs. `rectok config --docs` prints every key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional, Union

from .tree import doc_field


@dataclass
class RunConfig:
    name: str = doc_field("rectok_stage1", "run name; the run directory is output_dir/name")
    output_dir: str = doc_field("runs", "parent directory of run directories")
    seed: int = doc_field(0, "global seed (model init, data order, noise)")
    device: Literal["auto", "cpu", "cuda"] = doc_field("auto", "auto picks cuda when available")
    max_steps: int = doc_field(0, "stop after this many optimizer steps (0 = run the whole schedule)")
    weights_dir: Optional[str] = doc_field(None, "where weight paths `weights/FILE` resolve (teacher, LPIPS, ConvNeXt, "
                                           "Inception, FID reference); unset: $RECTOK_WEIGHTS, else ./weights")


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
    num_workers: Union[int, Literal["auto"]] = doc_field(
        "auto", "loader workers per rank: FFCV decoding threads, or PIL DataLoader processes; auto = the node's "
        "usable cores / its ranks (LOCAL_WORLD_SIZE), at least 1")
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
    tokenizer: Optional[str] = doc_field(
        None, "tokenizer checkpoint (run dir, checkpoint dir or state file) making the latents")
    tokenizer_use_ema: bool = doc_field(True, "use the tokenizer's EMA weights")
    latents: Literal["cache", "online"] = doc_field("cache", "read a latent cache, or encode images on the fly")
    cache_dir: Optional[str] = doc_field(
        None, "latent cache directory (unset: latent_cache/ beside the tokenizer checkpoint)")
    cache_shard_size: int = doc_field(4096, "images per cache shard")
    stats: Optional[str] = doc_field(
        None, "latent statistics file (unset: latent_stats.json beside the tokenizer checkpoint)")
    num_classes: int = doc_field(1000, "class labels; the label table has one more row, the null class")
    label_drop: float = doc_field(0.1, "probability of replacing a label by the null class in training")
    label_init_std: float = doc_field(0.02, "std of the label table at initialisation (DiT's 0.02; the CPU demo's "
                                      "short run starts its classes apart)")
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
    timeout_min: float = doc_field(30.0, "minutes a collective waits for the slowest rank (a rank computing "
                                         "latent statistics or saving) before the job fails")
    reshard_after_forward: bool = doc_field(True, "FSDP2: free gathered parameters after forward (less memory, "
                                            "one more all-gather in backward)")
    activation_checkpointing: Union[bool, Literal["auto"]] = doc_field(
        "auto", "recompute each transformer block in backward (less memory); auto = on CUDA when the memory "
        "estimate does not fit parallel.gpu_memory_gb even at a smaller micro-batch (trainer/engine/memory.py)")
    compile: Union[bool, Literal["auto"]] = doc_field("auto", "torch.compile each transformer block; auto = on CUDA")
    gpu_memory_gb: float = doc_field(
        0.0, "GPU memory (GiB) the memory plan fits into (0 = the device's total; 80 when planning on a CPU)")
    precision: Literal["auto", "bf16", "fp32"] = doc_field("auto", "autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    attention: Literal["auto", "flash", "sdpa", "math"] = doc_field(
        "auto", "attention kernel: auto = flash-attn when installed with CUDA kernels and the head dims fit, else "
        "SDPA; math = scores written out (the benchmarks' baseline)")
    adamw: Literal["auto", "apex", "fused", "foreach", "for-loop"] = doc_field(
        "auto", "AdamW kernel: auto = torch fused on CUDA, else foreach; apex only when asked; for-loop = per tensor")


@dataclass
class CheckpointConfig:
    every_steps: int = doc_field(2000, "save every N optimizer steps (0 = only at the end)")
    keep_last: int = doc_field(3, "complete checkpoints kept (older ones are deleted once a step has run "
                                  "finite from the newest, which is kept besides until then)")
    milestone_every_epochs: int = doc_field(0, "also save at every N-th epoch and keep those forever (0 = none)")
    resume: bool = doc_field(True, "resume from the newest complete checkpoint in the run directory")
    allow_config_change: bool = doc_field(
        False, "resume although the model, data, schedule or optimizer changed (refused by default)")


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
    progress: bool = doc_field(True, "progress bars on a terminal; off a terminal (a Slurm log, a pipe) no bar, a "
                               "progress line every progress_every_s instead")
    progress_every_s: float = doc_field(60.0, "off a terminal: seconds between progress lines (step, img/s, "
                                        "time left); 0 = none")
    tensorboard: bool = doc_field(
        True, "also write the metrics for TensorBoard (RUN/tensorboard); metrics.jsonl always")
    wandb: bool = doc_field(False, "also log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = doc_field("rectok", "wandb project")
    wandb_mode: Literal["online", "offline"] = doc_field("online", "offline: no network; `wandb sync` uploads later")
    peak_tflops: float = doc_field(
        0.0, "device peak TFLOP/s for MFU (0 = the table of GPUs in trainer/engine/throughput.py)")


@dataclass
class EvalConfig:
    every_epochs: int = doc_field(10, "evaluate every N epochs (0 = only at the end): tokenizer PSNR and "
                                  "reconstructions, DiT fixed-noise loss and samples")
    num_images: int = doc_field(1000, "images used (tokenizer: validation images; DiT: training latents); 0 = all")
    grid_images: int = doc_field(16, "images in the picture (reconstructions or samples), spread over the classes")
    at_start: bool = doc_field(False, "also evaluate before the first step of a fresh run (a 'before' picture)")
    fid_images: int = doc_field(10000, "images of the FID tracked at every evaluation (DiT: gFID of EMA samples; "
                                "tokenizer: rFID of EMA reconstructions of validation images spread over the classes); "
                                "0 = off")
    inception_weights: str = doc_field("weights/pt_inception-2015-12-05-6726825d.pth",
                                       "torch-fidelity's FID Inception-v3 weights (a local file; 'random' in tests)")
    reference: str = doc_field("weights/VIRTUAL_imagenet256_labeled.npz",
                               "FID reference statistics (.npz with mu, sigma: ADM's file or `rectok eval ref-stats`)")
    classifier: str = doc_field("none", "DiT class accuracy: the class judge's file (trained on the training split "
                                "when missing); auto = beside the training split; none = off")
    class_images: int = doc_field(100, "DiT samples (balanced labels) the class judge scores at every evaluation "
                                  "when eval.classifier is set; 0 = off")


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


def batch_split(d: DataConfig, world_size: int) -> tuple[int, int]:
    """(images per rank per step, images per rank per forward pass) for this world size."""
    per_rank = d.global_batch // world_size
    return per_rank, d.micro_batch or per_rank


def uses_teacher(cfg: TrainConfig) -> bool:
    """Stage-1 tokenizer training with the semantic loss: a frozen teacher is built and fed."""
    return cfg.task == "tokenizer" and cfg.tokenizer.stage == 1 and cfg.loss.semantic_weight > 0
