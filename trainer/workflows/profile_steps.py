"""`rectok profile`: W warm-up and M measured training steps of any recipe on this machine, as one table.

The steps are the trainer's own (`Trainer.train_step`: the configured strategy, precision, kernels,
compilation), on synthetic inputs by default so that no dataset, tokenizer checkpoint or weight file
is needed: frozen networks whose weight files are missing get random weights of the same shape, which
run at the same speed. The discriminator runs from the first step (loss.disc_start_epoch=0), so a
tokenizer step is the full one of the second half of training.

Under torchrun every rank runs the steps; rank 0 prints. `--scaling` predicts data-parallel throughput
from the measured step (trainer/engine/throughput.py: scaling_estimate).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from data import rank_batches
from data.files import write_json
from models.losses import NETWORK
from trainer.config.recipes import load_config
from trainer.config.schema import TrainConfig
from trainer.engine.distributed import env_from_launcher
from trainer.engine.loop import Trainer
from trainer.engine.memory import GIB, describe_modes, format_plan, plan_memory
from trainer.engine.throughput import COMM_VOLUME, PHASES, allreduce_seconds, scaling_estimate
from trainer.tasks.registry import build_task
from trainer.tasks.training import build_trainer

log = logging.getLogger(__name__)

SWEEP_ALIASES = {"batch": "data.global_batch", "micro": "data.micro_batch"}
PROFILE_OVERRIDES = ["data.synthetic=true", "eval.fid_images=0", "eval.every_epochs=0", "eval.at_start=false",
                     "checkpoint.every_steps=0", "checkpoint.resume=false", "logging.tensorboard=false",
                     "logging.wandb=false", "logging.progress=false", "sample.guidance=none"]
FROZEN_WEIGHTS = (("teacher", "weights"), ("loss", "lpips_vgg_weights"), ("loss", "convnext_weights"))


def profile_config(recipe: str, overrides: list[str], out_dir: str, world: int = 1) -> tuple[TrainConfig, list[str]]:
    """The recipe as profiled, and notes on what was substituted."""
    base = [f"run.output_dir={out_dir}", "run.name=profile", *PROFILE_OVERRIDES]
    cfg = load_config(recipe, base + ["loss.disc_start_epoch=0"] + list(overrides), world)
    notes = []
    if cfg.data.synthetic:
        notes.append("synthetic inputs (data.synthetic=false profiles the configured dataset)")
        for section, key in FROZEN_WEIGHTS:
            path = getattr(getattr(cfg, section), key)
            if path and path != "random" and not os.path.isfile(path):
                setattr(getattr(cfg, section), key, "random")
                notes.append(f"{section}.{key}: {path} not found, random weights of the same shape")
    return cfg, notes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(trainer: Trainer):
    """The rank's batches epoch after epoch, with the data wait timed."""
    epoch = 0
    while True:
        yield from trainer.timed_batches(rank_batches(len(trainer.train_set), trainer.per_rank, trainer.cfg.run.seed,
                                                      epoch, trainer.rank, trainer.world))
        epoch += 1


def executed_flops_per_sample(trainer: Trainer, batch) -> float | None:
    """FLOPs one training step executes per image (every network, counted by torch's FlopCounterMode);
    None with compiled blocks, whose kernels the counter does not see."""
    if trainer.memory.estimate.compile:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(*batch)
    return counter.get_total_flops() / batch[0].shape[0]


def trained_params(trainer: Trainer) -> int:
    return sum(p.numel() for part in trainer.task.trained_modules for p in part.module.parameters() if p.requires_grad)


def measure(cfg: TrainConfig, warmup: int, steps: int, trace_dir: str | None = None, label: str = "",
            trace_steps: int = 3) -> dict:
    """One profile row: build the trainer, run `warmup` steps, then time `steps` steps (then trace
    `trace_steps` more into `trace_dir`, if given)."""
    trainer = build_trainer(cfg, env_from_launcher())
    try:
        return _measure(trainer, cfg, warmup, steps, trace_dir, label, trace_steps)
    finally:
        trainer.close()  # the run directory's lock


def _measure(trainer: Trainer, cfg: TrainConfig, warmup: int, steps: int, trace_dir: str | None, label: str,
             trace_steps: int) -> dict:
    device, batches = trainer.device, _batches(trainer)
    if trainer.env.main:  # before any step: what auto chose, and whether it should fit
        print(format_plan(trainer.memory, trainer.world), flush=True)
    t_warm = time.perf_counter()
    losses = []
    for _ in range(warmup):
        trainer.train_step(*next(batches))
        losses.append(trainer.read_metrics()["total"])
    _sync(device)
    warm_s = time.perf_counter() - t_warm
    trainer.timer.read()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*next(batches))
    _sync(device)
    seconds = time.perf_counter() - start
    trainer.read_metrics()  # a NaN in the timed steps fails here (they read nothing back while timed)
    row = {"setting": label, "warmup_losses": losses, "per_device_batch": trainer.per_rank,
           "micro_batch": trainer.micro, "world": trainer.world, "device": str(device), "warmup_s": warm_s,
           "steps": steps,
           **trainer.throughput.record(steps, seconds, trainer.timer.read())}
    row["model_gflop_per_img"] = trainer.throughput.flops_per_sample / 1e9
    row["peak_tflops"] = trainer.throughput.peak_tflops
    executed = executed_flops_per_sample(trainer, next(batches))
    row["executed_gflop_per_img"] = executed / 1e9 if executed else None
    row["trained_params"] = trained_params(trainer)
    row["kernels"] = trainer.kernels
    e = trainer.memory.estimate
    row.update({"compile": e.compile, "activation_checkpointing": e.checkpointing,
                "mem/estimate_gb": e.total / GIB})
    row["strategy"] = cfg.parallel.strategy + (f"-{cfg.parallel.zero_stage}" if cfg.parallel.strategy == "deepspeed"
                                               and cfg.parallel.zero_stage == 3 else "")
    if trace_dir:
        row["trace"] = write_trace(trainer, batches, trace_dir, label or "profile", trace_steps)
    return row


def write_trace(trainer: Trainer, batches, trace_dir: str, label: str, steps: int = 3) -> str:
    """A torch.profiler trace (Chrome / Perfetto JSON) of `steps` steps, and its table of top operators."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    os.makedirs(trace_dir, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            trainer.train_step(*next(batches))
        _sync(trainer.device)
    path = os.path.join(trace_dir, f"trace_{name}_rank{trainer.rank}.json")
    prof.export_chrome_trace(path)
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    with open(os.path.join(trace_dir, f"ops_{name}_rank{trainer.rank}.txt"), "w") as f:
        f.write(events.table(sort_by=sort, row_limit=30))
        f.write(f"\nforward time per network over {steps} steps (backward is not attributed):\n")
        for key, ms in network_forward_ms(events, trainer.device).items():
            f.write(f"  {key:<24}{ms:>12.1f} ms\n")
    return path


def network_forward_ms(events, device: torch.device) -> dict[str, float]:
    """{label: ms} of the forward passes the tasks label (models.losses.NETWORK prefix): device time on CUDA
    (the kernels launched inside each label), CPU time otherwise."""
    out = {}
    for e in events:
        if e.key.startswith(NETWORK):
            us = getattr(e, "device_time_total", 0) if device.type == "cuda" else e.cpu_time_total
            out[e.key] = us / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def sweep_values(spec: str | None) -> tuple[str | None, list[str]]:
    """'batch=8,16' -> ('data.global_batch', ['8', '16'])."""
    if not spec:
        return None, [""]
    key, _, values = spec.partition("=")
    if not values:
        raise ValueError(f"--sweep wants KEY=V1,V2,... (got {spec!r})")
    return SWEEP_ALIASES.get(key, key), values.split(",")


def format_table(rows: list[dict]) -> str:
    cols = [("setting", "setting", "{}"), ("batch/dev", "per_device_batch", "{}"),
            ("step ms", "time/step_ms", "{:.1f}"),
            ("img/s/dev", "img_per_s_per_device", "{:.2f}"), ("img/s", "img_per_s", "{:.2f}"),
            ("TFLOP/s/dev", "tflops_per_device", "{:.3f}"), ("MFU", "mfu", "{:.1%}")]
    cols += [(f"{p} ms", f"time/{p}_ms", "{:.1f}") for p in PHASES]
    cols += [("peak mem GB", "mem/peak_gb", "{:.2f}"), ("est. GiB", "mem/estimate_gb", "{:.1f}"),
             ("model GFLOP/img", "model_gflop_per_img", "{:.1f}"),
             ("executed GFLOP/img", "executed_gflop_per_img", "{:.1f}")]
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_scaling(row: dict, gpus: list[int], gpus_per_node: int, intra: float, inter: float,
                   epochs: list[int], bw_source: str) -> str:
    step_s = row["time/step_ms"] / 1e3
    backward_s = 2 / 3 * row.get("time/fwd_bwd_ms", row["time/step_ms"]) / 1e3  # backward = 2x forward
    grad_bytes = 4 * row["trained_params"]  # fp32 gradients
    volume = COMM_VOLUME.get(row["strategy"], 1.0)
    est = scaling_estimate(step_s, backward_s, row["per_device_batch"], grad_bytes, volume, gpus, gpus_per_node,
                           intra, inter, epochs)
    head = (f"scaling estimate from '{row['setting'] or 'the measured step'}': {row['time/step_ms']:.1f} ms per step "
            f"at {row['per_device_batch']} images per device, {grad_bytes / 1e9:.2f} GB of fp32 gradients, "
            f"{row['strategy']} traffic x{volume}, bus bandwidth {bw_source}; each row: communication "
            f"not overlapped - fully overlapped with backward")
    lines = [head, f"{'GPUs':>6} {'bus GB/s':>9} {'comm ms':>8} {'img/s per GPU':>17} {'img/s total':>19}"
             + "".join(f" {f'{e} epochs (h)':>17}" for e in epochs)]
    for r in est:
        slow, fast = r.img_per_s_per_gpu
        lines.append(f"{r.gpus:>6} {r.bus_gbps:>9.0f} {r.comm_ms:>8.1f} {slow:>8.1f}-{fast:<8.1f} "
                     f"{slow * r.gpus:>9.0f}-{fast * r.gpus:<9.0f}"
                     + "".join(f" {r.hours[e][0]:>8.1f}-{r.hours[e][1]:<8.1f}" for e in epochs))
    return "\n".join(lines)


def measure_bus_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float | None:
    """All-reduce bus bandwidth (GB/s, NCCL's busbw) of the current process group, or None for one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    n = dist.get_world_size()
    x = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    dist.all_reduce(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(x)
    _sync(device)
    per_call = (time.perf_counter() - start) / repeats
    return allreduce_seconds(x.numel() * 4, n, 1.0) / per_call  # the time at 1 GB/s over the time taken


def run_profile(recipe: str, overrides: list[str], warmup: int = 3, steps: int = 10, trace_dir: str | None = None,
                sweep: str | None = None, scaling: bool = False, gpus: tuple[int, ...] = (8, 32, 256),
                gpus_per_node: int = 8, intra_gbps: float = 0.0, inter_gbps: float = 0.0,
                epochs: tuple[int, ...] = (80, 600), out_json: str | None = None, trace_steps: int = 3) -> list[dict]:
    env = env_from_launcher()
    key, values = sweep_values(sweep)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rectok-profile-") as tmp:
        for value in values:
            extra = [f"{key}={value}"] if key else []
            if key == "data.global_batch":
                extra.append("data.micro_batch=0")
            cfg, notes = profile_config(recipe, list(overrides) + extra, tmp, env.world)
            if env.main:
                for note in notes:
                    log.info("profile: %s", note)
            rows.append(measure(cfg, warmup, steps, trace_dir, extra[0] if extra else cfg.model.name, trace_steps))
        measured_bw = measure_bus_bandwidth(4 * rows[0]["trained_params"], torch.device(rows[0]["device"])) \
            if scaling else None
    if dist.is_initialized():
        dist.destroy_process_group()
    if not env.main:
        return rows
    print(f"rectok profile {recipe} {' '.join(overrides)}: {warmup} warm-up + {steps} measured steps on "
          f"{rows[0]['device']} x {rows[0]['world']}, {cfg.parallel.strategy}, precision {cfg.parallel.precision}, "
          f"compile {rows[0]['compile']}, checkpointing {rows[0]['activation_checkpointing']}, "
          f"kernels {rows[0]['kernels']}; "
          + (f"MFU against {rows[0]['peak_tflops']:g} TFLOP/s" if rows[0]['peak_tflops']
             else "no MFU: peak unknown for this device (set logging.peak_tflops)"))
    print(format_table(rows))
    if scaling:
        if measured_bw and not (intra_gbps or inter_gbps):
            intra = inter = measured_bw
            source = f"{measured_bw:.2f} GB/s measured on this {rows[0]['world']}-rank group"
        else:
            intra, inter = intra_gbps or 350.0, inter_gbps or 40.0
            source = (f"configured: {intra:g} GB/s within a node of {gpus_per_node} (NVLink), {inter:g} GB/s "
                      f"across nodes (--intra-gbps, --inter-gbps)")
        print(format_scaling(rows[0], list(gpus), gpus_per_node, intra, inter, list(epochs), source))
    for r in rows:
        if r.get("trace"):
            print(f"trace: {r['trace']} (open in https://ui.perfetto.dev or chrome://tracing)")
    if out_json:
        write_json(out_json, rows, indent=2)
    return rows


def estimate_only(recipe: str, overrides: list[str], gpus: tuple[int, ...]) -> list[str]:
    """The memory plan of a recipe on each GPU count, planned for CUDA (bf16 unless parallel.precision says
    otherwise) without running anything: the task is built on the meta device (shapes only, a few seconds
    even for DiT^DH-XL and the DINOv3-L teacher)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="rectok-estimate-") as tmp:
        for world in gpus:
            cfg, _ = profile_config(recipe, list(overrides), tmp, world)
            if cfg.parallel.precision == "auto":
                cfg.parallel.precision = "bf16"  # what auto means on the GPUs planned for
            with torch.device("meta"):
                task = build_task(cfg, torch.device("meta"), True)
            meta = torch.device("meta")  # the budget: parallel.gpu_memory_gb, else an 80 GB GPU
            plan, modes = plan_memory(cfg, world, meta, task, cuda=True), describe_modes(cfg, world, meta, task)
            names = ("eager", "compiled", "eager + checkpointing", "compiled + checkpointing")
            out.append(format_plan(plan, world) + f"\n  at micro-batch {modes[0].micro}: "
                       + "; ".join(f"{n} {e.total / GIB:.1f} GiB ({e.per_sample / 2 ** 20:.0f} MiB/sample)"
                                   for n, e in zip(names, modes)))
    return out
