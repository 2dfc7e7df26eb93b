"""Per-GPU memory estimate of a training step, and the plan `parallel.compile` / `activation_checkpointing` =
auto and `data.micro_batch` = 0 resolve to (docs/parallel.md, "Memory per GPU").

bytes per GPU = fixed + micro-batch x activations per sample + margin, where
  fixed        the trained modules' weights, gradients, AdamW moments, EMA and bf16 weight copies as the
               strategy holds them (DDP: all on every rank; FSDP2 / ZeRO-3: sharded over the shard group;
               ZeRO-1/2: optimizer state and master weights sharded), plus every frozen network (teacher,
               perceptual networks, a frozen tokenizer) as stored;
  activations  the tensors autograd saves for backward: per transformer block and token from its width d,
               SwiGLU hidden h and heads (`block_bytes_per_token`; checked against saved_tensors_hooks in
               tests/engine/test_memory.py), the image-space networks a loss differentiates through
               (measured on the meta device), and the token streams between blocks;
  margin       CUDA context, library workspaces and allocator fragmentation: 2 GiB + 5% of the activations.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from models.blocks import Block
from trainer.config.schema import TrainConfig, batch_split

from .precision import autocast_dtype

log = logging.getLogger(__name__)

GIB = 2 ** 30
PLANNING_BUDGET_GIB = 80.0  # parallel.gpu_memory_gb=0 off CUDA: plan for an 80 GB H100
MARGIN_BYTES, MARGIN_FRACTION = 2 * GIB, 0.05
# The smallest micro-batch (in tokens) auto shrinks to before it turns on activation checkpointing: below
# this the matmuls lose efficiency faster than recomputing each block's forward costs (+1/3 of the FLOPs).
MIN_MICRO_TOKENS = 8192
# Networks of the tokenizer task a loss differentiates through in image space (task attribute -> number of
# image arguments; the first takes the gradient): their saved activations are measured on the meta device.
IMAGE_NETS = {"perceptual": 2, "disc": 1}


@dataclass(frozen=True)
class BlockShape:
    width: int
    hidden: int
    heads: int
    tokens: int
    adaln: bool  # DiT blocks: modulated, gated residuals
    per_token_cond: bool  # DiT^DH head: the modulation is computed per token (docs/reference.md §2.2)


def block_bytes_per_token(b: BlockShape, compiled: bool, act: int, res: int = 4) -> int:
    """Bytes one block saves for backward per token. `act`: bytes of the autocast dtype (2 for bf16, 4 for
    fp32); `res`: of the residual stream (fp32 weights keep it fp32 under autocast).

    Eager (every op saves its inputs): per norm x, x*rstd and its cast (and the modulated copy), attention
    3d (qkv) + 2d (RoPE'd q, k) + d (output), SwiGLU 2h (w12 out) + h (silu) + h (product), the two
    gated outputs, and for per-token conditioning the SiLU input, its cast, the 6d modulation and the two
    (1 + scale). Compiled (per-block inductor, nothing recomputed but pointwise ops): the residual
    inputs, every matmul input, q, k, v and the attention output, w12's output, the gated outputs."""
    d, h = b.width, b.hidden
    lse = 4 * b.heads
    if compiled:
        out = 2 * res * d + 7 * act * d + 3 * act * h + lse
        out += 2 * act * d if b.adaln else 0
        out += (res + 7 * act) * d if b.per_token_cond else 0
        return out
    norms = 2 * (2 * res + act + (res if b.adaln else 0)) * d
    out = norms + 6 * act * d + lse + 4 * act * h
    out += 2 * act * d if b.adaln else 0
    out += (res + 9 * act) * d if b.per_token_cond else 0
    return out


def block_shapes(module: nn.Module) -> list[BlockShape]:
    """The transformer blocks of `module`, each with the token count of its nearest enclosing module
    that has `num_tokens` (the model, an encoder or a decoder: the full grid, the most a block sees)."""
    per_token = {id(b) for b in getattr(module, "head", [])} if hasattr(module, "trunk") else set()
    shapes: list[BlockShape] = []

    def walk(m: nn.Module, tokens: int) -> None:
        n = getattr(m, "num_tokens", None)
        tokens = n if isinstance(n, int) else tokens
        if isinstance(m, Block):
            shapes.append(BlockShape(m.attn.qkv.in_features, m.mlp.w3.in_features, m.attn.heads, tokens,
                                     hasattr(m, "adaLN_modulation"), id(m) in per_token))
            return
        for child in m.children():
            walk(child, tokens)
    walk(module, 1)
    return shapes


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, parameters left out."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            seen[s._cdata] = s.nbytes()  # the storage itself: views of one tensor count once
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def image_net_bytes_per_sample(net: nn.Module, n_images: int, image_size: int) -> int:
    """Activations an image network saves per sample when a loss differentiates through it, measured on a
    copy whose weights are fake CPU tensors (shapes and dtypes only: no memory, no compute, the network
    itself untouched), so one on the GPU or the meta device is measured alike, under its own autocast."""
    shape = (1, 3, image_size, image_size)
    with FakeTensorMode():
        memo = {id(t): (nn.Parameter(torch.empty(t.shape, dtype=t.dtype), t.requires_grad)
                        if isinstance(t, nn.Parameter) else torch.empty(t.shape, dtype=t.dtype))
                for t in (*net.parameters(), *net.buffers())}
        fake = copy.deepcopy(net, memo)
        x = torch.empty(shape, requires_grad=True)
        rest = [torch.empty(shape) for _ in range(n_images - 1)]
        return _saved_bytes(lambda: fake(x, *rest))


@dataclass
class Estimate:
    fixed: dict[str, int]  # bytes per GPU by part
    per_sample: int  # activation bytes per sample of the micro-batch
    micro: int
    compile: bool
    checkpointing: bool

    @property
    def activations(self) -> int:
        return self.per_sample * self.micro

    @property
    def margin(self) -> int:
        return MARGIN_BYTES + int(MARGIN_FRACTION * self.activations)

    @property
    def total(self) -> int:
        return sum(self.fixed.values()) + self.activations + self.margin


def _unique_bytes(tensors) -> int:
    return sum({id(t): t.numel() * t.element_size() for t in tensors}.values())


def fixed_bytes(cfg: TrainConfig, world: int, bf16: bool, trained: list[nn.Module], model: nn.Module,
                frozen: list[nn.Module]) -> dict[str, int]:
    """Weights, gradients, optimizer state, EMA and frozen networks per GPU, by part."""
    pc = cfg.parallel
    params = [p for m in trained for p in m.parameters()]
    n_train = sum(p.numel() for p in params if p.requires_grad)
    n_frozen = sum(p.numel() for p in params if not p.requires_grad)  # frozen parts of a trained model
    n_model = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in blk.parameters()) for m in trained for blk in m.modules()
                   if isinstance(blk, Block)), default=0)
    act = 2 if bf16 else 4
    if pc.strategy == "fsdp":
        s = world // pc.replicate_degree
        out = {"weights": 4 * (n_train + n_frozen) // s, "gradients": 4 * n_train // s,
               "adamw": 8 * n_train // s, "ema": 4 * n_model // s,
               # gathered blocks (this one and the prefetched next) and one block's unsharded gradients;
               # without resharding every gathered weight stays from forward to backward
               "gathered": (2 * act + 4) * largest if pc.reshard_after_forward
               else act * (n_train + n_frozen) + 4 * largest}
    elif pc.strategy == "deepspeed":
        s, z = world, pc.zero_stage
        out = {"weights": act * (n_train + n_frozen) // (s if z == 3 else 1)
               + (4 * n_train // s if bf16 else 0),  # bf16 modules, fp32 master weights partitioned
               "gradients": 4 * n_train // (s if z >= 2 else 1), "adamw": 8 * n_train // s,
               # ZeRO-3 averages partitions, but keeps the whole EMA model to assemble it into
               "ema": 4 * n_model + (4 * n_model // s if z == 3 else 0),
               "gathered": 2 * act * largest if z == 3 else 0}
    else:  # ddp: everything on every rank, and DDP's gradient buckets beside the gradients
        out = {"weights": 4 * (n_train + n_frozen) + (2 * (n_train + n_frozen) if bf16 else 0),  # + autocast copies
               "gradients": 4 * n_train * (2 if world > 1 else 1), "adamw": 8 * n_train, "ema": 4 * n_model}
    out["frozen networks"] = _unique_bytes([t for m in frozen for t in (*m.parameters(), *m.buffers())])
    return out


def frozen_modules(task) -> list[nn.Module]:
    """The task's networks that are not trained (teacher, perceptual networks, a frozen tokenizer, a guide)."""
    trained = {id(m) for p in task.trained_modules for m in p.module.modules()}
    return [v for v in vars(task).values() if isinstance(v, nn.Module) and id(v) not in trained]


def activation_bytes_per_sample(cfg: TrainConfig, task, compiled: bool, checkpointing: bool, bf16: bool) -> int:
    act = 2 if bf16 else 4
    total = 0
    for part in task.trained_modules:
        shapes = block_shapes(part.module)
        if not shapes:
            continue
        per_block = [s.tokens * block_bytes_per_token(s, compiled, act) for s in shapes]
        if checkpointing:  # each block keeps its input; backward recomputes one block at a time
            total += sum(4 * s.tokens * s.width for s in shapes) + max(per_block)
        else:
            total += sum(per_block)
        # token streams between blocks (embeddings, projections, final layer, loss): measured at about
        # (res + act) bytes per token of the widest stream for DiT^DH-S
        total += max(s.tokens for s in shapes) * (4 + act) * max(s.width for s in shapes)
    for name, n_images in IMAGE_NETS.items():
        net = getattr(task, name, None)
        if isinstance(net, nn.Module):
            total += image_net_bytes_per_sample(net, n_images, cfg.model.image_size)
    return total


def estimate(cfg: TrainConfig, world: int, device: torch.device, task, micro: int, compiled: bool,
             checkpointing: bool) -> Estimate:
    bf16 = autocast_dtype(cfg.parallel.precision, device) == torch.bfloat16
    fixed = fixed_bytes(cfg, world, bf16, [p.module for p in task.trained_modules], task.model, frozen_modules(task))
    return Estimate(fixed, activation_bytes_per_sample(cfg, task, compiled, checkpointing, bf16), micro, compiled,
                    checkpointing)


@dataclass
class MemoryPlan:
    estimate: Estimate  # of the plan chosen
    budget: int  # bytes
    per_rank: int
    eager: Estimate  # the same micro-batch eager without checkpointing, for comparison
    note: str

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget


def budget_bytes(cfg: TrainConfig, device: torch.device) -> int:
    """parallel.gpu_memory_gb, or the device's memory (CUDA), or an 80 GB GPU (planning on a CPU)."""
    if cfg.parallel.gpu_memory_gb > 0:
        return int(cfg.parallel.gpu_memory_gb * GIB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return int(PLANNING_BUDGET_GIB * GIB)


def plan_memory(cfg: TrainConfig, world: int, device: torch.device, task, cuda: bool | None = None) -> MemoryPlan:
    """What auto resolves to on `device` (`cuda`: plan for CUDA whatever the device, `rectok profile
    --estimate-only`): on CUDA compile on; then the largest micro-batch (down to MIN_MICRO_TOKENS, when
    data.micro_batch is 0) that fits the budget without checkpointing, else with checkpointing the largest
    that fits (down to 1). Off CUDA auto means off and nothing changes."""
    pc = cfg.parallel
    cuda = device.type == "cuda" if cuda is None else cuda
    per_rank, micro = batch_split(cfg.data, world)
    compiled = cuda if pc.compile == "auto" else pc.compile
    budget = budget_bytes(cfg, device)
    est = lambda m, ckpt: estimate(cfg, world, device, task, m, compiled, ckpt)  # noqa: E731
    eager = estimate(cfg, world, device, task, micro, False, False)
    ckpt_options = [False, True] if pc.activation_checkpointing == "auto" else [pc.activation_checkpointing]
    if not cuda:
        ckpt_options = ckpt_options[:1]
    micros = [m for m in range(micro, 0, -1) if per_rank % m == 0] if cuda and not cfg.data.micro_batch else [micro]
    tokens = max((s.tokens for p in task.trained_modules for s in block_shapes(p.module)), default=1)
    for ckpt in ckpt_options:
        last = ckpt == ckpt_options[-1]
        for m in micros:
            if not last and m < micro and m * tokens < MIN_MICRO_TOKENS:
                break
            e = est(m, ckpt)
            if e.total <= budget:
                return MemoryPlan(e, budget, per_rank, eager, "fits")
    e = est(micros[-1], ckpt_options[-1])
    return MemoryPlan(e, budget, per_rank, eager, "does not fit: expect out-of-memory (set data.micro_batch, "
                      "parallel.activation_checkpointing=true or parallel.strategy=fsdp)")


def resolve_memory_plan(cfg: TrainConfig, world: int, device: torch.device, task) -> tuple[TrainConfig, MemoryPlan]:
    """The config the strategy is built from: compile and activation checkpointing as booleans and the
    micro-batch the plan chose (the run's own config keeps what was asked: auto)."""
    plan = plan_memory(cfg, world, device, task)
    e = plan.estimate
    micro = 0 if e.micro == plan.per_rank else e.micro
    resolved = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, compile=e.compile,
                                                                      activation_checkpointing=e.checkpointing),
                                   data=dataclasses.replace(cfg.data, micro_batch=micro))
    return resolved, plan


def compile_enabled(value: bool | str, device: torch.device) -> bool:
    """parallel.compile as the run resolves it (auto: on CUDA), for code built before the plan is made."""
    return device.type == "cuda" if value == "auto" else bool(value)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def format_plan(plan: MemoryPlan, world: int) -> str:
    """The estimate as `rectok profile` and the training log print it."""
    e = plan.estimate
    fixed = sum(e.fixed.values())
    mode = ("compiled" if e.compile else "eager") + (" + activation checkpointing" if e.checkpointing else "")
    accum = plan.per_rank // e.micro
    lines = [f"memory per GPU ({world} GPU{'s' if world > 1 else ''}, {plan.per_rank} images per GPU, budget "
             f"{_gib(plan.budget)}): plan {mode}, micro-batch {e.micro}"
             + (f" x {accum} accumulated" if accum > 1 else "") + f": {plan.note}",
             f"  fixed {_gib(fixed)} (" + ", ".join(f"{k} {_gib(v)}" for k, v in e.fixed.items() if v) + ")",
             f"  activations {_gib(e.activations)} ({e.per_sample / 2 ** 20:.0f} MiB per sample x {e.micro})",
             f"  margin {_gib(e.margin)}; total {_gib(e.total)}",
             f"  (eager at micro-batch {plan.eager.micro}: activations {_gib(plan.eager.activations)}, "
             f"total {_gib(plan.eager.total)})"]
    return "\n".join(lines)


def describe_modes(cfg: TrainConfig, world: int, device: torch.device, task) -> list[Estimate]:
    """Eager, compiled and checkpointed estimates at the configured micro-batch (the table in docs/parallel.md)."""
    micro = batch_split(cfg.data, world)[1]
    return [estimate(cfg, world, device, task, micro, c, k) for c, k in ((False, False), (True, False),
                                                                          (False, True), (True, True))]

