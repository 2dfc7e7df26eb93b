"""The process group: who this process is (torchrun's environment), and the few collectives the loop needs.

torchrun (one machine or many) sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; a plain `python -m trainer.cli train` is a world of one. Sharded strategies need a group
even then, so one is made on a free local port.

Across nodes, gloo and NCCL pick the network interface from the host name unless told, and a host
name that resolves to a loopback address (Debian's `127.0.1.1 host` line) makes a rank listen where no
other node can reach it. So a job of several nodes chooses the interface that carries its traffic to
the master address and sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to it, unless the user set them.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config.tree import ConfigError

log = logging.getLogger("rectok")

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 0  # ranks on this node; 0: all of them (one node)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world // self.local_world) if self.local_world else 1


def env_from_launcher() -> DistEnv:
    """This process's place as torchrun (or Slurm through a launcher that sets the same names) told it."""
    get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
    world = get("WORLD_SIZE", 1)
    return DistEnv(get("RANK", 0), world, get("LOCAL_RANK", 0), get("LOCAL_WORLD_SIZE", world))


def interface_address(name: str) -> str | None:
    """The IPv4 address of network interface `name` (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_towards(host: str) -> tuple[str, str] | None:
    """(interface, address) of this machine that its traffic to `host` leaves from. When the route is
    the loopback (`host` is this machine by a 127.x name), the one other interface with an IPv4
    address; None when that is not one (the choice is then left to gloo/NCCL)."""
    try:
        target = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))  # UDP: nothing is sent; the kernel picks the source address
            source = s.getsockname()[0]
    except OSError:
        return None
    named = [(name, interface_address(name)) for _, name in socket.if_nameindex()]
    named = [(name, addr) for name, addr in named if addr]
    if not source.startswith("127."):
        return next(((n, a) for n, a in named if a == source), None)
    outside = [(n, a) for n, a in named if not a.startswith("127.")]
    return outside[0] if len(outside) == 1 else None


def choose_socket_interface() -> None:
    """For a job of several nodes: GLOO/NCCL_SOCKET_IFNAME set to the interface towards MASTER_ADDR,
    unless the user set either."""
    given = {k: os.environ[k] for k in SOCKET_IFNAME_VARS if os.environ.get(k)}
    if given:
        log.info("network interface for the process group as set: %s", given)
        return
    chosen = interface_towards(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    if chosen is None:
        log.warning("could not tell which network interface reaches the master %s; gloo/NCCL choose from the "
                    "host name (set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME if ranks cannot connect)",
                    os.environ.get("MASTER_ADDR"))
        return
    name, address = chosen
    os.environ.update(dict.fromkeys(SOCKET_IFNAME_VARS, name))
    log.info("several nodes: the process group runs over %s (%s), towards the master %s:%s (GLOO_SOCKET_IFNAME / "
             "NCCL_SOCKET_IFNAME override)", name, address, os.environ.get("MASTER_ADDR"),
             os.environ.get("MASTER_PORT"))


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
    if env.nodes > 1:
        choose_socket_interface()
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
