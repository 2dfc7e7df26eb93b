"""The contracts of the training loop (trainer/engine/loop.py): what it needs from a task, from a
parallel strategy and from a training set. The loop is written against these alone; the tokenizer and
DiT tasks (trainer/tasks/), the strategies (trainer/parallel/) and the data sources (data/, the
latent cache) implement them without importing this module.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from data.folder import Batch  # (inputs, labels, sample ids): uint8 images or cached latent moments


@dataclass
class TrainedModule:
    """A set of trained parameters with its own optimizer (the generator; the tokenizer's discriminator).
    Several are stepped in list order on the same batch."""
    name: str
    module: nn.Module
    start_epoch: float = 0.0  # skipped before this epoch (the discriminator's late start)
    start_step: int = 0       # start_epoch in optimizer steps, set by the loop once it knows the epoch length


class TrainingSet(Protocol):
    """A dataset read by index lists: data/sources.py (FFCV, PIL), data/synthetic.py, the latent cache."""
    labels: Sequence[int]

    def __len__(self) -> int: ...

    def batches(self, index_batches: list[list[int]], num_workers: int) -> Iterable[Batch]:
        """One batch per index list, in order."""
        ...


class Task(Protocol):
    """What is trained and how one micro-batch's loss is formed; owns its models, data and evaluation."""
    trained_modules: list[TrainedModule]  # stepped in list order
    model: nn.Module                      # the module the EMA follows and evaluation samples from
    train_set: TrainingSet
    autocast_dtype: torch.dtype | None    # bf16 autocast, or None for fp32

    def train_flops_per_sample(self) -> int:
        """Model FLOPs of one training image, forward + backward (for MFU)."""
        ...

    def prepare(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One micro-batch of loader data -> device tensors (random flips drawn here)."""
        ...

    def losses(self, inputs: tuple[torch.Tensor, ...], step: int
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({trained module name: loss to backpropagate}, {logged term: value}) for one micro-batch."""
        ...

    def evaluate(self, ema_model: nn.Module, step: int, batch_size: int) -> dict:
        """{metric: value}; every rank runs it (sharded models need all), only rank 0 writes files."""
        ...


class Strategy(Protocol):
    """How trained modules are spread over ranks and stepped: DDP, FSDP2 or DeepSpeed ZeRO. It owns the
    optimizers and the EMA and reads and writes their checkpoint shards."""
    format: str            # the checkpoint files it writes ("dcp" or "deepspeed"), recorded in meta.json
    skips_on_device: bool  # a non-finite step can be skipped on the device (no host read per step)

    def setup(self, trained: list[TrainedModule], model: nn.Module, peak_lr: float) -> None:
        """Wraps the trained modules in place; builds their optimizers and the EMA of `model`."""
        ...

    def set_lr(self, part: TrainedModule, lr: float) -> None: ...

    def backward(self, part: TrainedModule, loss: torch.Tensor, accum: int, last_micro: bool) -> None:
        """Gradients of one micro-batch; reduced across ranks on the last one."""
        ...

    def step(self, part: TrainedModule, clip: float, finite: torch.Tensor | None = None) -> torch.Tensor | None:
        """Clip (returning the pre-clip global norm), step unless `finite` is false, zero the gradients."""
        ...

    def update_ema(self, model: nn.Module, finite: torch.Tensor | None = None) -> None:
        """One EMA step towards `model`, held where `finite` is false."""
        ...

    def ema_model(self) -> nn.Module:
        """The whole EMA model, for evaluation (a collective under ZeRO-3: every rank calls it)."""
        ...

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """This rank's part of everything a checkpoint saves: parameters, optimizer state, EMA (checked
        finite before a save)."""
        ...

    def save(self, directory: str) -> None: ...

    def load(self, directory: str) -> None: ...
