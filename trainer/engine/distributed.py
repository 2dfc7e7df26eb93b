"""The process group: who this process is (torchrun's environment), and the few collectives the loop needs.

torchrun (one machine or many) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a
plain `python -m trainer.cli train` is a world of one. Sharded strategies need a group even then,
so one is made on a free local port.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config.tree import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_from_launcher() -> DistEnv:
    """This process's place as torchrun (or Slurm through a launcher that sets the same names) told it."""
    get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
    return DistEnv(get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(env: DistEnv, device: torch.device, need_group: bool, timeout_min: float = 30) -> None:
    """Joins (or, for a world of one that needs collectives, makes) the default process group. A collective
    waits `timeout_min` for the slowest rank (parallel.timeout_min) before the job fails."""
    if dist.is_initialized() or (env.world == 1 and not need_group):
        return
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if "MASTER_ADDR" not in os.environ:  # a world of one started without a launcher
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world, timeout=timedelta(minutes=timeout_min),
                            device_id=device if device.type == "cuda" else None)


def resolve_device(name: str) -> torch.device:
    """run.device: auto picks CUDA when there is a device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    """One GPU per process: LOCAL_RANK picks it."""
    return torch.device("cuda", env.local_rank) if device.type == "cuda" else device


def join_process_group(env: DistEnv, device_name: str) -> torch.device:
    """This process's device (run.device), in the launcher's process group when there are several ranks:
    what an evaluation under torchrun needs before its first collective."""
    device = device_for(env, resolve_device(device_name))
    init_distributed(env, device, need_group=False)
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The average of `x` over all ranks (a copy; `x` itself is untouched)."""
    x = x.clone()
    if active():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def broadcast_str(text: str | None) -> str:
    """Rank 0's string on every rank."""
    if not active():
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x`, concatenated in rank order, on every rank (shares may differ in length:
    evaluation splits n samples into contiguous shares, so rank order is sample order)."""
    if not active():
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = x.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=device))
    sizes = [int(s) for s in sizes]
    pad = local.new_zeros((max(sizes) - len(x), *x.shape[1:]))
    parts = [local.new_empty((max(sizes), *x.shape[1:])) for _ in sizes]
    dist.all_gather(parts, torch.cat([local, pad]))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default group (0, 1 without one)."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)
