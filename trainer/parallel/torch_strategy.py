"""DDP and FSDP2 behind the strategy protocol (trainer/engine/protocols.py), with DCP checkpoints.

Each trained module gets, in this order: per-block activation checkpointing and torch.compile
(block_wrapping.py), then its data-parallel wrapping:
  ddp        torch's composable replicate(): DistributedDataParallel applied in place, so the
             task keeps calling its modules and their methods as in single-device code
  fsdp       FSDP2 fully_shard on every transformer block, each part holding blocks, and the root,
             on a (shard) mesh, or a (replicate, shard) mesh for HSDP
Under bf16 (parallel.precision) both run the task's bf16 autocast; FSDP2 also gathers the blocks' weights
in bf16 (half the traffic) while everything else matches DDP's fp32 parameters under autocast: the small
parts outside the blocks (embedders, position embeddings, norms, heads) keep fp32 weights, inputs are
never cast (the flow time t and the RoPE tables reach the model in fp32), so the residual stream between
blocks has DDP's dtypes; master weights, gradient reduction and the EMA are fp32.
Frozen modules (teacher, perceptual networks, a frozen tokenizer) never come here: each rank keeps
its own copy; they are not synchronised and hold no optimizer state.

DCP files hold every tensor once, with its global shape: a checkpoint written by N ranks loads on M
ranks and under the other strategy of the two.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.tensor import DTensor

from models.blocks import Block
from models.weights import UnreadableWeightsError, as_refusal, restricted_unpickle, weights_only_loading
from trainer.config.schema import TrainConfig
from trainer.engine.distributed import DistEnv
from trainer.engine.ema import EMA, local_shard
from trainer.engine.optim import build_adamw, set_lr
from trainer.engine.precision import autocast_dtype
from trainer.engine.protocols import TrainedModule

from .block_wrapping import apply_block_options, transformer_blocks

log = logging.getLogger(__name__)

# What a DCP .metadata pickle may name (found by saving DDP and FSDP2 checkpoints of a module with fp32 and
# bf16 tensors and its AdamW state, as TorchStrategy._state does, and recording the pickle's globals): DCP's
# metadata dataclasses, torch.Size, dtypes, layouts (by name) and the checkpoint's path. None runs code.
_DCP_MODULE = "torch.distributed.checkpoint"
DCP_METADATA_GLOBALS = frozenset({
    *(f"{_DCP_MODULE}.metadata.{name}" for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    f"{_DCP_MODULE}.filesystem._StorageInfo", "torch.Size", "torch.serialization._get_layout", "pathlib.PosixPath",
    *(f"torch.{name}" for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
})

# Methods the tasks call besides forward (evaluation, latent encoding): FSDP2 must gather around them too.
ENTRY_METHODS = ("encode", "decode", "reconstruct")


class TorchStrategy:
    """DDP (replicate) and FSDP2 (fully_shard); checkpoints through torch.distributed.checkpoint."""
    format = "dcp"

    def __init__(self, cfg: TrainConfig, env: DistEnv, device: torch.device, adamw_impl: str):
        self.cfg, self.env, self.device, self.adamw_impl = cfg, env, device, adamw_impl
        self.pc = cfg.parallel
        self.mesh = self._mesh() if self.pc.strategy == "fsdp" else None

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh
        rep, env = self.pc.replicate_degree, self.env
        if env.nodes > 1 and env.local_world % (env.world // rep):
            # A shard group that spans nodes all-gathers every block's weights over the network.
            log.warning("parallel.replicate_degree=%d: shard groups of %d ranks span nodes of %d ranks; HSDP with "
                        "parallel.replicate_degree=%d replicates across the nodes and shards within each",
                        rep, env.world // rep, env.local_world, env.nodes)
        if rep == 1:
            return init_device_mesh(self.device.type, (self.env.world,), mesh_dim_names=("shard",))
        log.info("HSDP: %d replicas x %d shards%s", rep, env.world // rep,
                 " (replicas across the nodes, shards within each)" if env.nodes == rep else "")
        return init_device_mesh(self.device.type, (rep, self.env.world // rep), mesh_dim_names=("replicate", "shard"))

    def _shard(self, module: nn.Module, block_policy, other_policy) -> None:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        kw = dict(mesh=self.mesh, reshard_after_forward=self.pc.reshard_after_forward)
        for block in transformer_blocks(module):
            fully_shard(block, mp_policy=block_policy, **kw)
        for child in module.children():  # encoder, pixel decoder...: their own parameters gather with them
            if not isinstance(child, (Block, nn.ModuleList)) and transformer_blocks(child):
                fully_shard(child, mp_policy=other_policy, **kw)
        fully_shard(module, mp_policy=other_policy, **kw)
        for name in ENTRY_METHODS:
            if hasattr(module, name):
                register_fsdp_forward_method(module, name)

    def setup(self, trained: list[TrainedModule], model: nn.Module, peak_lr: float) -> None:
        """Wraps the trained modules in place, then builds their optimizers and the EMA of `model`."""
        pc, o = self.pc, self.cfg.optim
        self.trained = trained
        self.ema = EMA(model, self.cfg.ema.decay)  # copied before wrapping: a plain module with the same start
        policies = ()
        if pc.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy
            bf16 = autocast_dtype(pc.precision, self.device) == torch.bfloat16
            # fp32 master weights (the sharded parameters) and fp32 gradient reduction everywhere; under bf16
            # the blocks' weights are gathered in bf16 (autocast would cast them for the matmuls anyway).
            # Inputs are never cast: FSDP2's default would round t to bf16 and the RoPE tables the blocks
            # take as arguments. The parts outside the blocks keep fp32 weights, as under DDP: a bf16
            # position embedding or input norm would make the residual stream bf16.
            fp32 = MixedPrecisionPolicy(cast_forward_inputs=False)
            blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                          cast_forward_inputs=False) if bf16 else fp32
            policies = (blocks, fp32)
            self._shard(self.ema.model, fp32, fp32)
        for p in trained:
            apply_block_options(p.module, pc.activation_checkpointing, pc.compile)
            if pc.strategy == "fsdp":
                self._shard(p.module, *policies)
            elif self.env.world > 1:
                from torch.distributed._composable.replicate import replicate
                # Buffers are recomputed (RoPE) or only used in training mode (BatchNorm statistics):
                # not broadcast at every forward.
                replicate(p.module, device_ids=[self.device] if self.device.type == "cuda" else None,
                          broadcast_buffers=False)
        self.optimizers = {p.name: build_adamw(p.module, peak_lr, o.betas, o.eps, o.weight_decay, self.adamw_impl)
                           for p in trained}

    # -- one step ---------------------------------------------------------------------------------
    def set_lr(self, part: TrainedModule, lr: float) -> None:
        set_lr(self.optimizers[part.name], lr)

    def backward(self, part: TrainedModule, loss: torch.Tensor, accum: int, last_micro: bool) -> None:
        """Gradients are reduced across ranks on the last micro-batch only."""
        if self.env.world > 1 and hasattr(part.module, "set_requires_gradient_sync"):
            part.module.set_requires_gradient_sync(last_micro)
        (loss / accum).backward()

    @property
    def skips_on_device(self) -> bool:
        """torch's fused AdamW skips a step (and its step count) when told found_inf, on the device."""
        return self.adamw_impl == "fused"

    def step(self, part: TrainedModule, clip: float, finite: torch.Tensor | None = None) -> torch.Tensor | None:
        """Clip (returning the pre-clip norm over all ranks' shards), step unless `finite` (a device bool)
        is false, zero the gradients."""
        norm = None
        if clip > 0:
            params = [q for q in part.module.parameters() if q.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        opt = self.optimizers[part.name]
        if finite is not None:
            opt.found_inf = (~finite).float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def update_ema(self, model: nn.Module, finite: torch.Tensor | None = None) -> None:
        self.ema.update(model, finite)

    def ema_model(self) -> nn.Module:
        return self.ema.model

    def state_tensors(self):
        """Local shards of the parameters, the optimizer state and the EMA."""
        for p in self.trained:
            yield from (local_shard(q) for q in p.module.parameters())
            for state in self.optimizers[p.name].state.values():
                yield from (local_shard(v) for v in state.values() if isinstance(v, torch.Tensor))
        yield from (local_shard(q) for q in self.ema.model.parameters())

    # -- checkpoints ------------------------------------------------------------------------------
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        return {"modules": {p.name: get_model_state_dict(p.module) for p in self.trained},
                "ema": get_model_state_dict(self.ema.model),
                "optimizers": {p.name: get_optimizer_state_dict(p.module, self.optimizers[p.name])
                               for p in self.trained}}

    def save(self, directory: str) -> None:
        with _single_process_ok():
            dcp.save(self._state(), checkpoint_id=os.path.join(directory, "state"))

    def load(self, directory: str) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        state, reader = self._state(), _Reader(os.path.join(directory, "state"))
        with _single_process_ok(), _refusals_raised(reader):
            dcp.load(state, storage_reader=reader, planner=_Planner(reader.path))
        for p in self.trained:
            set_model_state_dict(p.module, state["modules"][p.name])
            set_optimizer_state_dict(p.module, self.optimizers[p.name], state["optimizers"][p.name])
        set_model_state_dict(self.ema.model, state["ema"])


class _Reader(dcp.FileSystemReader):
    """DCP's file reader with its metadata unpickled through DCP_METADATA_GLOBALS (DCP uses plain pickle)."""

    refusal: UnreadableWeightsError | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = restricted_unpickle(f, DCP_METADATA_GLOBALS, "DCP checkpoint", str(path))
                if not isinstance(metadata, Metadata):
                    raise UnreadableWeightsError(f"DCP checkpoint: {path} holds a {type(metadata).__name__}, "
                                                 f"not DCP metadata")
            except UnreadableWeightsError as e:
                self.refusal = e
                raise
        if getattr(metadata, "storage_meta", None) is None:  # written by an older torch
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def _refusals_raised(reader: _Reader):
    """DCP turns a reader's or planner's error into a CheckpointException (a BaseException) listing each
    rank's, the metadata's as text only: a refusal (ours, or torch.load's for a tensor entry) is raised as
    UnreadableWeightsError."""
    try:
        yield
    except CheckpointException as e:
        found = reader.refusal or next(filter(None, (as_refusal(exc, "DCP checkpoint", str(reader.path))
                                                     for exc, _ in e.failures.values())), None)
        if found is None:
            raise
        raise found from None


class _WeightsOnlyBytes:
    """DCP's planners torch.load the entries that are not tensors (optimizer hyper-parameters) with
    weights_only=False: here with weights_only, a refusal naming the file and the entry."""

    def __init__(self, path: str | os.PathLike, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path = path

    def load_bytes(self, read_item, value) -> None:
        stored = self.metadata.storage_data[read_item.storage_index]
        where = f"{os.path.join(self.path, stored.relative_path)} (entry {read_item.dest_index.fqn})"
        with weights_only_loading("DCP checkpoint", path=where):
            super().load_bytes(read_item, value)


class _Planner(_WeightsOnlyBytes, DefaultLoadPlanner):
    pass


class _EntriesPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    pass


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns when it runs without a process group: a world of one under DDP is meant to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        yield


def save_dcp_weights(directory: str, state: dict) -> None:
    """Whole tensors ({"modules": {name: state dict}, "ema": state dict}) as a DCP checkpoint written by
    this process alone: what consolidate.load_state reads back (an imported checkpoint, without optimizer
    state)."""
    with _single_process_ok():
        dcp.save(state, checkpoint_id=os.path.join(directory, "state"), no_dist=True)


def load_dcp_weights(directory: str, keys: set[str]) -> dict:
    """Whole tensors of the named entries ("ema", "modules.model", ...) of a DCP checkpoint, read by this
    process alone (no collective: any one rank, or a single process without a group, may call it)."""
    state: dict = {}
    reader = _Reader(os.path.join(directory, "state"))
    with _refusals_raised(reader):
        _load_state_dict(state, storage_reader=reader, planner=_EntriesPlanner(reader.path, keys=keys), no_dist=True)
    return state
