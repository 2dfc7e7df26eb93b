"""DeepSpeed ZeRO (stages 1-3) behind the strategy protocol (trainer/engine/protocols.py).

One engine per trained module, each given our AdamW (the same parameter groups and lr schedule as the other
strategies; DeepSpeed's JIT-built fused Adam is never needed). Forward is called on the module
itself, so task code is the same under every strategy: ZeRO-3's gather hooks live on the modules.
Checkpoints are DeepSpeed's own (resume on the same world size); `load_deepspeed_weights`
consolidates one in a single process for sampling, export and stage-2 initialisation.
"""
from __future__ import annotations

import glob
import logging
import math
import os

import torch
import torch.distributed as dist
from torch import nn

from models.weights import read_checkpoint, weights_only_loading
from trainer.config.schema import TrainConfig, batch_split
from trainer.engine.distributed import DistEnv
from trainer.engine.ema import EMA
from trainer.engine.optim import build_adamw, set_lr
from trainer.engine.precision import autocast_dtype
from trainer.engine.protocols import TrainedModule

from .block_wrapping import apply_block_options

log = logging.getLogger(__name__)

DS_DIR, EMA_DIR, EMA_FULL = "deepspeed", "ema", "full.pt"


def deepspeed_globals() -> list:
    """The Python objects DeepSpeed's checkpoint files hold besides tensors and containers, all inert
    records (found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 checkpoints,
    fp32 and bf16): DeepSpeed reads its files with weights_only=False, we with these allowed only."""
    # deepspeed is heavy to import and only DeepSpeed checkpoints need it: imported where used.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def deepspeed_config(cfg: TrainConfig, env: DistEnv, device: torch.device) -> dict:
    d, pc = cfg.data, cfg.parallel
    per_rank, micro = batch_split(d, env.world)
    bf16 = autocast_dtype(pc.precision, device) == torch.bfloat16
    return {
        "train_batch_size": d.global_batch, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": per_rank // micro, "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": pc.zero_stage, "overlap_comm": device.type == "cuda",
                              "contiguous_gradients": True},
        # bf16 parameters and compute, fp32 master weights, gradients accumulated and reduced in fp32
        "bf16": {"enabled": bf16}, "communication_data_type": "fp32",
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "zero_allow_untested_optimizer": True, "steps_per_print": 2 ** 31 - 1, "wall_clock_breakdown": False,
    }


def _norm_statistics_follow_weights(module: nn.Module) -> None:
    """DeepSpeed's bf16 casts parameters but keeps buffers (RoPE tables, fixed embeddings) fp32, and batch
    norm (the discriminator's) refuses bf16 weights with fp32 running statistics: those follow the weights."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.running_mean is not None:
            for name in ("running_mean", "running_var"):
                setattr(m, name, getattr(m, name).to(m.weight.dtype))


class PartitionedEMA:
    """The EMA under ZeRO-1/2/3: each rank averages the fp32 master weights its optimizer partition holds,
    never the module's parameters (bf16 copies of them under bf16), and no collective runs per step.

    Each rank holds one contiguous piece of every flattened parameter (possibly empty): the span of its
    ZeRO-1/2 fp32 partition (DeepSpeed's `_hp_mapping` fragment) or its ZeRO-3 partition (padding left
    out); in rank order the pieces make the parameter. Frozen parameters have no master: rank 0 holds them
    whole and keeps their starting value. The whole EMA model (`template`, whose buffers are the fp32 ones
    copied before DeepSpeed touched the module) is assembled by one all-reduce when it is evaluated or saved.
    """

    def __init__(self, module: nn.Module, template: nn.Module, decay: float, stage3: bool):
        self.decay, self.template = decay, template.eval().requires_grad_(False)
        self.module, self.stage3 = module, stage3
        rank = dist.get_rank()
        self.shapes, self.spans = {}, {}
        for name, p in module.named_parameters():
            self.shapes[name] = tuple(p.ds_shape) if stage3 else tuple(p.shape)
            numel = math.prod(self.shapes[name])
            if stage3:
                part = p.ds_tensor.ds_numel
                start = min(rank * part, numel)
                self.spans[name] = (start, min(part, numel - start))
            elif p.requires_grad:
                mapping = getattr(p, "_hp_mapping", None)  # None: this rank's partition holds none of it
                self.spans[name] = (0, 0) if mapping is None else (mapping.lp_fragment_address.start,
                                                                   mapping.lp_fragment_address.numel)
            else:
                self.spans[name] = (0, numel if rank == 0 else 0)
        init = dict(self.template.named_parameters())
        self.shadow = {k: self._piece(init[k], k).clone() for k in self.spans}
        self.link()

    def _piece(self, whole: torch.Tensor, name: str) -> torch.Tensor:
        start, numel = self.spans[name]
        return whole.detach().reshape(-1)[start:start + numel]

    def link(self) -> None:
        """Finds the fp32 master pieces in the optimizer (again after a checkpoint load, which may rebuild
        DeepSpeed's links). Looked up once, not per step: ZeRO-3's accessor synchronises the stream."""
        from deepspeed.utils import safe_get_local_fp32_param  # heavy; DeepSpeed runs only
        self.masters = {}
        for name, p in self.module.named_parameters():
            if not p.requires_grad or not self.spans[name][1]:
                continue
            if self.stage3:
                self.masters[name] = safe_get_local_fp32_param(p)[:self.spans[name][1]]
            else:
                self.masters[name] = p._hp_mapping.hp_fragment.reshape(-1)

    @torch.no_grad()
    def restore_masters(self) -> None:
        """DeepSpeed bf16 builds its fp32 master weights from the bf16-cast module: they start rounded.
        The starting weights, exact, come back from the fp32 copy taken before (the EMA's)."""
        for k, m in self.masters.items():
            m.copy_(self.shadow[k])

    @torch.no_grad()
    def update(self, module: nn.Module, finite: torch.Tensor | None = None) -> None:
        names = list(self.masters)
        torch._foreach_lerp_([self.shadow[k] for k in names], [self.masters[k] for k in names], 1.0 - self.decay)

    @torch.no_grad()
    def full_model(self) -> nn.Module:
        """Every rank assembles the whole EMA (a collective: all ranks call it together)."""
        params = dict(self.template.named_parameters())
        flat = torch.zeros(sum(q.numel() for q in params.values()), dtype=torch.float32,
                           device=next(iter(self.shadow.values())).device)
        offset = 0
        for name, q in params.items():
            start, numel = self.spans[name]
            flat[offset + start:offset + start + numel].copy_(self.shadow[name])
            offset += q.numel()
        dist.all_reduce(flat)  # the pieces are disjoint: their sum is the whole
        offset = 0
        for q in params.values():
            q.copy_(flat[offset:offset + q.numel()].view_as(q))
            offset += q.numel()
        return self.template

    def state_dict(self) -> dict:
        """This rank's pieces (ZeRO-3, one file per rank: in rank order they make each parameter)."""
        return {"shadow": self.shadow, "shapes": self.shapes}

    def load_state_dict(self, state: dict) -> None:  # same world size: the loop checked it
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v[:self.shadow[k].numel()])  # older files held padded partitions

    def load_whole(self, state: dict) -> None:
        """The whole EMA state dict (ZeRO-1/2's file): each rank keeps its pieces."""
        self.template.load_state_dict(state)
        for k, q in self.template.named_parameters():
            self.shadow[k].copy_(self._piece(q, k))


class DeepSpeedStrategy:
    format = "deepspeed"

    def __init__(self, cfg: TrainConfig, env: DistEnv, device: torch.device, adamw_impl: str):
        self.cfg, self.env, self.device, self.adamw_impl = cfg, env, device, adamw_impl
        self.stage3 = cfg.parallel.zero_stage == 3

    def setup(self, trained: list[TrainedModule], model: nn.Module, peak_lr: float) -> None:
        import deepspeed  # heavy (it probes accelerators on import) and needed only by this strategy
        pc, o = self.cfg.parallel, self.cfg.optim
        self.trained = trained
        # fp32, copied before DeepSpeed partitions or casts anything: the EMA's start, buffers and template.
        ema = EMA(model, self.cfg.ema.decay)
        config = deepspeed_config(self.cfg, self.env, self.device)
        self.engines = {}
        for p in trained:
            apply_block_options(p.module, pc.activation_checkpointing, pc.compile)
            optimizer = build_adamw(p.module, peak_lr, o.betas, o.eps, o.weight_decay, self.adamw_impl)
            engine, *_ = deepspeed.initialize(model=p.module, optimizer=optimizer, config=config)
            self.engines[p.name] = engine
            _norm_statistics_follow_weights(p.module)
        self.ema = PartitionedEMA(model, ema.model, ema.decay, self.stage3)
        self.ema.restore_masters()
        log.info("DeepSpeed ZeRO-%d over %d ranks (bf16 %s)", pc.zero_stage, self.env.world, config["bf16"]["enabled"])

    def set_lr(self, part: TrainedModule, lr: float) -> None:
        set_lr(self.engines[part.name].optimizer, lr)

    def backward(self, part: TrainedModule, loss: torch.Tensor, accum: int, last_micro: bool) -> None:
        engine = self.engines[part.name]
        engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        if not last_micro:
            engine.step()  # counts the micro-step; the update happens at the accumulation boundary

    skips_on_device = False  # the engines step on their own: the loop checks for NaN before each step

    def step(self, part: TrainedModule, clip: float, finite: torch.Tensor | None = None) -> torch.Tensor | None:
        engine = self.engines[part.name]
        engine.step()
        norm = engine.get_global_grad_norm() if clip > 0 else None
        return None if norm is None else torch.as_tensor(norm)

    def update_ema(self, model: nn.Module, finite: torch.Tensor | None = None) -> None:
        self.ema.update(model, finite)

    def ema_model(self) -> nn.Module:
        return self.ema.full_model()

    def state_tensors(self):
        """This rank's parameters (its ZeRO-3 partitions), the fp32 master partitions and Adam state the ZeRO
        optimizer holds, and the EMA (its partitions under ZeRO-3)."""
        for engine in self.engines.values():
            for q in engine.module.parameters():
                yield q.ds_tensor if hasattr(q, "ds_tensor") else q
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the AdamW inside ZeRO's wrapper
            for group in inner.param_groups:
                yield from group["params"]
            for state in inner.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        yield from self.ema.shadow.values()

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(os.path.join(directory, DS_DIR), tag=name, save_latest=False)
        os.makedirs(os.path.join(directory, EMA_DIR), exist_ok=True)
        if self.stage3:
            torch.save(self.ema.state_dict(), os.path.join(directory, EMA_DIR, f"rank_{self.env.rank:05d}.pt"))
        else:  # ZeRO-1/2 modules are whole on every rank: so is their EMA file
            whole = self.ema.full_model().state_dict()
            if self.env.main:
                torch.save(whole, os.path.join(directory, EMA_DIR, EMA_FULL))

    def load(self, directory: str) -> None:
        root = os.path.join(directory, DS_DIR)
        for name, engine in self.engines.items():
            with weights_only_loading("DeepSpeed checkpoint", deepspeed_globals(), root):
                path, _ = engine.load_checkpoint(root, tag=name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint for {name} in {directory}")
        self.ema.link()  # the engines' load may have re-linked their fp32 partitions
        ema_file = f"rank_{self.env.rank:05d}.pt" if self.stage3 else EMA_FULL
        state = read_checkpoint(os.path.join(directory, EMA_DIR, ema_file), "EMA of a checkpoint")
        if self.stage3:
            self.ema.load_state_dict(state)
        else:
            self.ema.load_whole(state)


def load_deepspeed_weights(directory: str) -> dict:
    """{"modules": {name: fp32 state dict}, "ema": state dict} of a DeepSpeed checkpoint, in one process."""
    # deepspeed is heavy to import and only DeepSpeed checkpoints need it: imported where used.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    root = os.path.join(directory, DS_DIR)
    with weights_only_loading("DeepSpeed checkpoint", deepspeed_globals(), root):
        modules = {name: get_fp32_state_dict_from_zero_checkpoint(root, tag=name)
                   for name in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, name))}
    full = os.path.join(directory, EMA_DIR, EMA_FULL)
    if os.path.isfile(full):
        ema = read_checkpoint(full, "EMA of a checkpoint")
    else:  # ZeRO-3: pieces by rank, concatenated in rank order, padding (in older files) dropped
        files = sorted(glob.glob(os.path.join(directory, EMA_DIR, "rank_*.pt")))
        parts = [read_checkpoint(f, "EMA of a checkpoint") for f in files]
        shapes = parts[0]["shapes"]
        ema = {k: torch.cat([p["shadow"][k] for p in parts])[:torch.Size(s).numel()].view(s) for k, s in shapes.items()}
        # Buffers (fixed: RoPE, Fourier weights, position embedding) are not partitioned: the raw model's
        # are the EMA's too.
        ema.update({k: v for k, v in modules["generator"].items() if k not in ema})
    return {"modules": modules, "ema": ema}
