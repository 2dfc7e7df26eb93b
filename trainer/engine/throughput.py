"""Throughput accounting shared by training runs and `rectok profile`: img/s, TFLOP/s, MFU, step split, memory.

MFU = (model FLOPs per training image x images per second per device) / device peak. Model FLOPs come
from the tasks (`train_flops_per_sample`, built on the models' analytic `flops_per_sample`), never
from a profiler, so MFU compares runs, recipes and machines on one scale (as nanoGPT's estimate_mfu).

The step split is timed with CUDA events on a GPU (read back only when a record is made, so the hot
path gains no host synchronisation) and with the host clock on a CPU, where every op is synchronous.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

from data.synthetic import IMAGENET_TRAIN

# Dense peak TFLOP/s without sparsity (vendor data sheets), by a substring of torch.cuda.get_device_name().
# Longest match wins, so "H100 PCIe" is not read as "H100". logging.peak_tflops overrides the table.
PEAK_TFLOPS = {
    # name: (bf16/fp16 tensor cores, fp32 without TF32)
    "H100": (989.0, 67.0),  # SXM; docs/reference.md §6
    "H100 PCIe": (756.0, 51.0),
    "H100 NVL": (835.0, 60.0),
    "H200": (989.0, 67.0),
    "GH200": (989.0, 67.0),
    "B200": (2250.0, 80.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
}

PHASES = ("data", "fwd_bwd", "sync", "optim", "ema")  # the step split, in step order


def device_peak_tflops(device: torch.device, low_precision: bool, override: float = 0.0) -> tuple[float | None, str]:
    """(peak TFLOP/s or None when unknown, where it came from)."""
    if override > 0:
        return override, "logging.peak_tflops"
    if device.type != "cuda":
        return None, f"no peak known for {device.type} (set logging.peak_tflops for MFU)"
    name = torch.cuda.get_device_name(device)
    hits = [k for k in PEAK_TFLOPS if k.lower() in name.lower()]
    if not hits:
        return None, f"{name} is not in trainer.engine.throughput.PEAK_TFLOPS (set logging.peak_tflops for MFU)"
    key = max(hits, key=len)
    return PEAK_TFLOPS[key][0 if low_precision else 1], f"{key} {'bf16' if low_precision else 'fp32'} peak"


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or the process's peak resident memory (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # bytes on macOS, KiB on Linux


class StepTimer:
    """Time spent in each phase of the steps since the last `read()`, with no synchronisation per step.

    `phase(name)` ends the phase running since the previous mark and starts `name`; `stop()` ends it.
    Host-side phases (the data wait) use the host clock on every device: it is what the GPU waits for.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.open: tuple[str, object] | None = None
        self.pending: list[tuple[str, object, object]] = []
        self.host: dict[str, float] = {}

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def phase(self, name: str) -> None:
        now = self._now()
        if self.open is not None:
            self.pending.append((*self.open, now))
        self.open = (name, now)

    def stop(self) -> None:
        if self.open is not None:
            self.pending.append((*self.open, self._now()))
            self.open = None

    def add_host(self, name: str, seconds: float) -> None:
        self.host[name] = self.host.get(name, 0.0) + seconds

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (waits for the GPU to reach the last mark)."""
        out = dict(self.host)
        if self.cuda and self.pending:
            self.pending[-1][2].synchronize()
        for name, start, end in self.pending:
            dt = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out[name] = out.get(name, 0.0) + dt
        self.pending, self.host = [], {}
        return out


@dataclass
class Throughput:
    """Turns (steps, seconds, phase times) into the logged throughput record of one interval."""
    global_batch: int
    world: int
    flops_per_sample: float  # model FLOPs of one training image, forward + backward
    peak_tflops: float | None  # per device
    device: torch.device

    def record(self, steps: int, seconds: float, phases: dict[str, float]) -> dict[str, float]:
        images = steps * self.global_batch
        per_device = images / max(seconds, 1e-9) / self.world
        tflops = per_device * self.flops_per_sample / 1e12
        out = {"img_per_s": per_device * self.world, "img_per_s_per_device": per_device,
               "tflops_per_device": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        for name in PHASES:
            if name in phases:
                out[f"time/{name}_ms"] = 1e3 * phases[name] / max(steps, 1)
        out["time/step_ms"] = 1e3 * seconds / max(steps, 1)
        out["mem/peak_gb"] = peak_memory_gb(self.device)
        return out


# -- scaling estimate ---------------------------------------------------------------------------------
# Gradient-synchronisation traffic per step in units of one all-reduce of the gradients: FSDP2 and
# ZeRO-3 all-gather the parameters in forward and backward and reduce-scatter the gradients.
COMM_VOLUME = {"ddp": 1.0, "fsdp": 1.5, "deepspeed": 1.0, "deepspeed-3": 1.5}


def allreduce_seconds(nbytes: float, gpus: int, bus_gbps: float) -> float:
    """Ring all-reduce time: 2 (N-1)/N x bytes over the bus bandwidth (NCCL's busbw convention)."""
    return 0.0 if gpus <= 1 else 2 * (gpus - 1) / gpus * nbytes / (bus_gbps * 1e9)


@dataclass
class ScalingRow:
    gpus: int
    bus_gbps: float
    comm_ms: float
    img_per_s_per_gpu: tuple[float, float]  # (communication not overlapped, fully overlapped with backward)
    hours: dict[int, tuple[float, float]]  # epochs -> (slowest, fastest)


def scaling_estimate(step_s: float, backward_s: float, per_gpu_batch: int, grad_bytes: float, volume: float,
                     gpus: list[int], gpus_per_node: int, intra_gbps: float, inter_gbps: float,
                     epochs: list[int], dataset_size: int = IMAGENET_TRAIN) -> list[ScalingRow]:
    """Predicted data-parallel throughput from a measured single-device step.

    Weak scaling at a fixed per-GPU batch: each step adds the gradient synchronisation, either in full
    (no overlap) or only the part longer than the backward pass it can hide behind (full overlap).
    Within a node the bus is NVLink (intra_gbps), across nodes the network (inter_gbps).
    """
    rows = []
    for n in gpus:
        bw = intra_gbps if n <= gpus_per_node else inter_gbps
        comm = volume * allreduce_seconds(grad_bytes, n, bw)
        slow = per_gpu_batch / (step_s + comm)
        fast = per_gpu_batch / (step_s + max(0.0, comm - backward_s))
        hours = {e: (e * dataset_size / (slow * n) / 3600, e * dataset_size / (fast * n) / 3600) for e in epochs}
        rows.append(ScalingRow(n, bw, 1e3 * comm, (slow, fast), hours))
    return rows
