"""The training loop shared by every stage: schedule, accumulation, clipping, EMA, checkpoints, logging."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
from tqdm import tqdm

from data import make_loader, rank_batches, steps_per_epoch

from .checkpoint import latest_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, TrainConfig, check_files, dump_config
from .ema import EMA
from .kernels import select_kernels
from .optim import build_adamw, lr_schedule, set_lr
from .task import build_task

log = logging.getLogger("rectok")


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss: training stops instead of stepping through it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def _setup_run_dir(cfg: TrainConfig) -> str:
    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(dump_config(cfg))
    return run_dir


def _log_to_file(run_dir: str) -> logging.Handler:
    handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        check_files(cfg)  # before anything is written or built
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.device = resolve_device(cfg.run.device)
        torch.manual_seed(cfg.run.seed + rank)
        self.run_dir = _setup_run_dir(cfg)
        self.task = build_task(cfg, self.device)
        self.train_set = self.task.train_set
        d = cfg.data
        self.per_rank = d.global_batch // world_size
        self.micro = d.micro_batch or self.per_rank
        self.spe = steps_per_epoch(len(self.train_set), self.per_rank, world_size)
        if self.spe == 0:
            raise ConfigError(f"data.global_batch: {d.global_batch} exceeds the {len(self.train_set)} "
                              f"training samples")
        self.total_steps = cfg.schedule.epochs * self.spe
        self.last_step = min(self.total_steps, cfg.run.max_steps or self.total_steps)
        self.peak_lr = cfg.optim.base_lr * d.global_batch / 256
        sc = cfg.schedule
        self.lr_at = lr_schedule(sc.kind, self.spe, self.total_steps, sc.warmup_epochs, self.peak_lr, sc.min_lr,
                                 sc.decay_start_epoch, sc.decay_end_epoch)
        for p in self.task.players:
            p.start_step = round(p.start_epoch * self.spe)
        o = cfg.optim
        self.kernels = select_kernels(cfg.parallel.attention, self.device, [p.module for p in self.task.players])
        self.optimizers = {p.name: build_adamw(p.module, self.peak_lr, o.betas, o.eps, o.weight_decay,
                                               self.kernels["adamw"]) for p in self.task.players}
        self.ema = EMA(self.task.model, cfg.ema.decay)
        self.step, self.resumed_from = 0, None
        if cfg.checkpoint.resume and latest_checkpoint(self.run_dir):
            self._resume(latest_checkpoint(self.run_dir))
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.step / self.spe,
                "modules": {k: m.state_dict() for k, m in self.task.modules_to_save().items()},
                "ema": self.ema.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "rng": rng_state(), "config": dump_config(self.cfg)}

    def _resume(self, path: str) -> None:
        state = load_state(path)
        for k, m in self.task.modules_to_save().items():
            m.load_state_dict(state["modules"][k])
        self.ema.load_state_dict(state["ema"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        set_rng_state(state["rng"])
        self.step, self.resumed_from = state["step"], path
        if state.get("config") != dump_config(self.cfg):
            log.warning("resuming %s with a config that differs from the checkpoint's; the saved one is "
                        "inside %s", self.run_dir, path)

    def save(self) -> str:
        path = save_checkpoint(self.run_dir, self.step, self.state_dict(), self.cfg.checkpoint.keep_last)
        log.info("checkpoint %s", path)
        return path

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self, batch: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        lr = self.lr_at(self.step)
        active = [p for p in self.task.players if self.step >= p.start_step]
        for p in active:
            set_lr(self.optimizers[p.name], lr)
        inputs = self.task.prepare(batch, labels)
        accum = inputs[0].shape[0] // self.micro
        sums: dict[str, float] = {}
        for i in range(accum):
            sl = slice(i * self.micro, (i + 1) * self.micro)
            losses, terms = self.task.losses(tuple(x[sl] for x in inputs), self.step)
            # One device-to-host copy per micro-batch serves both the NaN check and the logs.
            values = dict(zip(terms, torch.stack([v.detach().float() for v in terms.values()]).tolist()))
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.step} (epoch {self.step // self.spe}, micro-batch {i}, "
                    f"sample ids {sample_ids[sl].tolist()}): " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
            (sum(losses.values()) / accum).backward()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        for p in active:
            params = [q for q in p.module.parameters() if q.requires_grad]
            if cfg.optim.grad_clip > 0:
                sums[f"grad_norm/{p.name}"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
            self.optimizers[p.name].step()
            self.optimizers[p.name].zero_grad(set_to_none=True)
        self.ema.update(self.task.model)
        self.step += 1
        sums["lr"] = lr
        return sums

    def evaluate(self) -> dict:
        return self.task.evaluate(self.ema.model, self.step, self.micro)

    # -- the loop --------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> dict:
        handler = _log_to_file(self.run_dir)
        try:
            return self._fit()
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.resumed_from:
            log.info("resumed from %s at step %d", self.resumed_from, self.step)
        log.info("run %s: %d steps (%d/epoch), global batch %d, micro %d, lr %.3g, device %s, %d training samples",
                 self.run_dir, self.last_step, self.spe, cfg.data.global_batch, self.micro, self.peak_lr,
                 self.device, len(self.train_set))
        bar = tqdm(total=self.last_step, initial=self.step, disable=not cfg.logging.progress, desc="train",
                   dynamic_ncols=True)
        last, start = {}, {}
        if cfg.eval.at_start and self.step == 0:
            start = self.evaluate()
            self._log({"step": 0, **start})
        t0, step0 = time.perf_counter(), self.step
        while self.step < self.last_step:
            epoch, offset = divmod(self.step, self.spe)
            batches = rank_batches(len(self.train_set), self.per_rank, cfg.run.seed, epoch, self.rank, self.world)
            for batch, labels, ids in make_loader(self.train_set, batches[offset:], cfg.data.num_workers):
                metrics = self.train_step(batch, labels, ids)
                bar.update(1)
                if self.step % cfg.logging.log_every == 0 or self.step == self.last_step:
                    dt = time.perf_counter() - t0
                    metrics["img_per_s"] = (self.step - step0) * cfg.data.global_batch / max(dt, 1e-9)
                    t0, step0 = time.perf_counter(), self.step
                    last = {"step": self.step, "epoch": self.step / self.spe, **metrics}
                    self._log(last)
                    bar.set_postfix(loss=f"{metrics['total']:.4f}", lr=f"{metrics['lr']:.2e}")
                    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in last.items()))
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save()
                if self.step % self.spe == 0 and cfg.eval.every_epochs and \
                        (self.step // self.spe) % cfg.eval.every_epochs == 0 and self.step < self.last_step:
                    self._log({"step": self.step, **self.evaluate()})
                if self.step >= self.last_step:
                    break
        bar.close()
        ckpt = self.save()
        final = {"step": self.step, **self.evaluate()}
        self._log(final)
        log.info("done: %s", " ".join(f"{k}={v}" for k, v in final.items()))
        return {"run_dir": self.run_dir, "checkpoint": ckpt, "metrics": self.metrics_path, "kernels": self.kernels,
                "last_train": last, "at_start": start, **final}


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).fit()
