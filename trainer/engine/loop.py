"""The training loop shared by every stage: schedule, accumulation, clipping, EMA, checkpoints, logging.

It drives a Task and a Strategy (trainer/engine/protocols.py) that its caller chooses
(trainer/tasks/training.py builds both from the config), so it knows no model, loss or parallelism.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from data import rank_batches, steps_per_epoch
from data.files import write_text
from trainer.config.recipes import dump_config
from trainer.config.schema import TrainConfig, batch_split
from trainer.config.tree import ConfigError
from trainer.config.validation import validate

from .checkpoint import (
    MARKER,
    CheckpointError,
    checkpoint_root,
    config_changes,
    library_error,
    load_rng,
    newest_verified,
    prune_checkpoints,
    read_meta,
    reject_checkpoint,
    save_checkpoint,
    save_rng,
)
from .distributed import (
    DistEnv,
    barrier,
    broadcast_str,
    device_for,
    env_from_launcher,
    init_distributed,
    mean_over_ranks,
    resolve_device,
)
from .kernels import select_kernels
from .memory import format_plan, resolve_memory_plan
from .optim import lr_schedule
from .preemption import StopRequest, write_done
from .preflight import check_files
from .protocols import Strategy, Task
from .run_lock import RunLock
from .throughput import StepTimer, Throughput, device_peak_tflops
from .tracking import METRICS, ProgressLines, Tracker, bar_disabled, log_to_file, truncate_metrics

# (config, device, is rank 0) -> the task; (config, env, device, AdamW kernel) -> the strategy.
TaskFactory = Callable[[TrainConfig, torch.device, bool], Task]
StrategyFactory = Callable[[TrainConfig, DistEnv, torch.device, str], Strategy]
# What every rank computes together before the task is built (DiT latent statistics, each rank its share).
TaskPreparation = Callable[[TrainConfig, torch.device], None]

log = logging.getLogger("rectok")


# With an optimizer that skips a step on the device, losses are read back at least this often (besides log
# steps, saves and evaluations): a NaN or a checkpoint signal is acted on within this many steps.
READ_EVERY = 10


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss: training stops instead of stepping through it."""


class NonFiniteStateError(NonFiniteLossError):
    """NaN/Inf weights or optimizer state at a save: they are not saved over the good checkpoints."""


@dataclass
class StepValues:
    """One step's loss terms, all-reduced but still on the device until read back."""
    step: int
    names: list[str]
    reduced: torch.Tensor  # [terms..., stop request], the mean over ranks
    local: torch.Tensor  # [micro-batches, terms] of this rank: where a NaN came from
    sample_ids: torch.Tensor
    lr: float
    norms: dict = field(default_factory=dict)  # gradient norms, device tensors


def _collective(fn: Callable[[], str | None], main: bool) -> str | None:
    """Rank 0 runs `fn` (returning a checkpoint path or None) while the others wait; an error is raised
    on every rank (rank 0's own, a one-line copy elsewhere), so none is left waiting in a collective."""
    result, error, failure = None, "", None
    if main:
        try:
            result = fn()
        except (ConfigError, CheckpointError, OSError) as e:
            failure, error = e, f"{type(e).__name__}:{e}"
    error = broadcast_str(error)
    if failure is not None:
        raise failure
    if error:
        kind, message = error.split(":", 1)
        raise (CheckpointError if kind == "CheckpointError" else ConfigError)(message)
    return broadcast_str(result) or None


def seed_micro_batch(seed: int, step: int, index: int) -> None:
    """Every random draw of a micro-batch (flips, masks, noise, times) comes from (seed, step, index),
    where index counts micro-batches over all ranks: a run's numbers then do not depend on how the
    global batch is split over ranks, and a resumed run draws exactly what the uninterrupted one did."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") >> 1)


class Trainer:
    """One training run: set-up (process group, run directory, task, strategy, resume), `fit` to the last
    step or a stop request, and `train_step` for callers that drive steps themselves (`rectok profile`)."""

    def __init__(self, cfg: TrainConfig, build_task: TaskFactory, build_strategy: StrategyFactory,
                 env: DistEnv | None = None, stop: StopRequest | None = None,
                 prepare_task: TaskPreparation | None = None):
        check_files(cfg)  # before anything is written or built
        self.stop, self.stopping = stop, False
        self.env = env = env or env_from_launcher()
        validate(cfg, env.world)
        self.cfg, self.rank, self.world = cfg, env.rank, env.world
        self.device = device_for(env, resolve_device(cfg.run.device))
        init_distributed(env, self.device, need_group=cfg.parallel.strategy != "ddp",
                         timeout_min=cfg.parallel.timeout_min)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        self.run_dir = cfg.run_dir
        self.lock = RunLock(self.run_dir)
        _collective(self._lock, env.main)
        try:
            self._set_up(cfg, env, build_task, build_strategy, prepare_task)
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        self.lock.acquire()

    def close(self) -> None:
        """Releases the run directory (`fit` does when it ends)."""
        self.lock.release()

    def _set_up(self, cfg: TrainConfig, env: DistEnv, build_task: TaskFactory, build_strategy: StrategyFactory,
                prepare_task: TaskPreparation | None):
        # Which checkpoint to resume, and whether the config may resume it, before anything is written.
        start = _collective(self._choose_checkpoint, env.main) if cfg.checkpoint.resume else None
        if env.main:
            write_text(os.path.join(self.run_dir, "config.yaml"), dump_config(cfg))
        if prepare_task is not None:
            prepare_task(cfg, self.device)
        # Rank 0 first: it creates what the ranks share (the default dataset, pictures' folders).
        if not env.main:
            barrier()
        self.task = build_task(cfg, self.device, env.main)
        if env.main:
            barrier()
        self.train_set = self.task.train_set
        # auto compile / checkpointing / micro-batch resolved once from the memory estimate; the strategy gets
        # the resolved config, the run keeps what was asked (config.yaml, checkpoints: resumes compare that)
        run_cfg, self.memory = resolve_memory_plan(cfg, env.world, self.device, self.task)
        if env.main:
            log.info("%s", format_plan(self.memory, env.world))
        d = cfg.data
        self.per_rank, self.micro = batch_split(run_cfg.data, env.world)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), self.per_rank, env.world)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.global_batch: {d.global_batch} exceeds the {len(self.train_set)} "
                              f"training samples")
        self.total_steps = cfg.schedule.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, cfg.run.max_steps or self.total_steps)
        self.peak_lr = cfg.optim.base_lr * d.global_batch / 256
        sc = cfg.schedule
        self.lr_for_step = lr_schedule(sc.kind, self.steps_per_epoch, self.total_steps, sc.warmup_epochs,
                                       self.peak_lr, sc.min_lr, sc.decay_start_epoch, sc.decay_end_epoch)
        for p in self.task.trained_modules:
            p.start_step = round(p.start_epoch * self.steps_per_epoch)
        self.kernels = select_kernels(cfg.parallel.attention, self.device,
                                      [p.module for p in self.task.trained_modules], cfg.parallel.adamw)
        self.strategy = build_strategy(run_cfg, env, self.device, self.kernels["adamw"])
        self.strategy.setup(self.task.trained_modules, self.task.model, self.peak_lr)
        # The NaN check must come before the optimizer step. When every optimizer can skip a step on the
        # device (torch's fused AdamW takes found_inf), the losses stay on the device and are read every few
        # steps: no device-to-host copy in the hot path. Otherwise they are read at every step.
        self.deferred = self.strategy.skips_on_device
        self.unread: list[StepValues] = []
        self.last_read: dict[str, float] = {}
        self.step, self.resumed_from, self.unconfirmed = 0, None, None
        if start:
            self._resume(start)
        self.metrics_path = os.path.join(self.run_dir, METRICS)
        if env.main:  # records past the resumed step were logged by the run that is being redone
            truncate_metrics(self.run_dir, self.step if self.resumed_from else -1)
        peak, source = device_peak_tflops(self.device, self.task.autocast_dtype is not None, cfg.logging.peak_tflops)
        self.throughput = Throughput(d.global_batch, env.world, self.task.train_flops_per_sample(), peak, self.device)
        self.timer = StepTimer(self.device)
        log.info("throughput: %.1f GFLOP per training image (model FLOPs, forward + backward); MFU against %s",
                 self.throughput.flops_per_sample / 1e9, f"{peak:g} TFLOP/s ({source})" if peak else source)

    # -- state -----------------------------------------------------------------------------------
    def _choose_checkpoint(self) -> str | None:
        """Rank 0: the newest checkpoint whose files verify (newer damaged ones are moved aside), checked
        against this run's config."""
        os.makedirs(self.run_dir, exist_ok=True)
        path, problems = newest_verified(self.run_dir)
        if problems and path is None:
            raise CheckpointError(f"no checkpoint of {self.run_dir} verifies ({'; '.join(problems)}); nothing was "
                                  f"changed: move them away to start over, or set checkpoint.resume=false")
        self._reject_damaged(problems)
        if path is None:
            return None
        meta = read_meta(path)
        if meta.get("imported_from"):
            raise ConfigError(f"{self.run_dir} holds weights imported from {meta['imported_from']} (no optimizer "
                              f"state to resume); train in another run directory starting from them "
                              f"(dit.init_from={self.run_dir}, or tokenizer.init_from for stage 2)")
        changes = config_changes(meta.get("config", ""), self.cfg)
        if changes and not self.cfg.checkpoint.allow_config_change:
            raise ConfigError(f"{self.run_dir} was trained with another config; resuming would mix two recipes: "
                              + "; ".join(changes) + ". Use another run.name, or checkpoint.allow_config_change=true "
                              "(rectok train --allow-config-change) if the change is deliberate")
        for change in changes:
            log.warning("resuming %s with a changed config (allowed): %s", self.run_dir, change)
        return path

    def _resume(self, path: str) -> None:
        """Loads `path`; a checkpoint that fails to load is moved aside and the next older one is tried."""
        while True:
            try:
                return self._load(path)
            except (CheckpointError, ConfigError, KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # the checkpoint library's CheckpointException is a BaseException
                cause = library_error(e)
                reason = f"failed to load: {type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"[:500]
                step = read_meta(path)["step"]
                log.error("checkpoint %s %s", path, reason)
            path = _collective(functools.partial(self._fall_back, path, step, reason), self.env.main)
            if path is None:
                raise CheckpointError(f"no checkpoint of {self.run_dir} loads; the last one {reason}")

    def _fall_back(self, path: str, step: int, reason: str) -> str | None:
        reject_checkpoint(path, reason)
        older, problems = newest_verified(self.run_dir, below=step)
        self._reject_damaged(problems)
        return older

    def _reject_damaged(self, problems: list[str]) -> None:
        """Rank 0: moves aside the checkpoints `newest_verified` found damaged ("step_N: reason")."""
        for problem in problems:
            name, reason = problem.split(": ", 1)
            reject_checkpoint(os.path.join(checkpoint_root(self.run_dir), name), reason)

    def _load(self, path: str) -> None:
        meta = read_meta(path)
        if meta["format"] != self.strategy.format:
            raise ConfigError(f"parallel.strategy: {path} was written by {meta['strategy']!r} "
                              f"({meta['format']} files); resume it with that strategy")
        if meta["format"] == "deepspeed" and meta["world"] != self.world:
            raise ConfigError(f"{path} was written by {meta['world']} DeepSpeed ranks; DeepSpeed checkpoints resume "
                              f"on the same number, not {self.world} (ddp/fsdp checkpoints resume on any)")
        self.strategy.load(path)
        load_rng(path, self.rank)
        self.step, self.resumed_from = meta["step"], path

    def save(self, milestone: bool = False) -> str:
        self._check_state_finite()

        def write(directory: str) -> None:
            self.strategy.save(directory)
            save_rng(directory, self.rank)
        meta = {"epoch": self.step / self.steps_per_epoch, "format": self.strategy.format,
                "strategy": self.cfg.parallel.strategy, "config": dump_config(self.cfg)}
        path = save_checkpoint(self.run_dir, self.step, write, meta, self.env, milestone)
        self.unconfirmed = self.step  # older checkpoints are pruned once a step from this one has run finite
        log.info("checkpoint %s", path)
        return path

    def _check_state_finite(self) -> None:
        """Every rank's weights, optimizer state and EMA finite, or no save: non-finite weights saved would
        replace the good checkpoints (a NaN loss is caught before its step; corrupt state is not)."""
        flags = [torch.isfinite(t).all() for t in self.strategy.state_tensors() if t.is_floating_point() and t.numel()]
        local = bool(torch.stack(flags).all()) if flags else True  # one device-to-host copy per save
        if mean_over_ranks(torch.tensor([float(local)], device=self.device)).item() < 1:
            raise NonFiniteStateError(
                f"non-finite weights or optimizer state at step {self.step}{'' if local else f' (rank {self.rank})'}"
                f": not saved; the checkpoints of {self.run_dir} are kept")

    def _confirm(self, step: int) -> None:
        """Losses through `step` were finite: the checkpoint in waiting has been trained from, the older
        ones can go."""
        if self.unconfirmed is not None and step >= self.unconfirmed:
            if self.env.main:
                prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
            self.unconfirmed = None

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self, batch: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor
                   ) -> dict[str, float] | None:
        """One optimizer step. Returns its metrics when they were read back (every step unless deferred)."""
        cfg, strategy = self.cfg, self.strategy
        lr = self.lr_for_step(self.step)
        active = [p for p in self.task.trained_modules if self.step >= p.start_step]
        for p in active:
            strategy.set_lr(p, lr)
        accum = batch.shape[0] // self.micro
        values = []
        self.timer.phase("fwd_bwd")
        for i in range(accum):
            sl = slice(i * self.micro, (i + 1) * self.micro)
            seed_micro_batch(cfg.run.seed, self.step, self.rank * accum + i)
            losses, terms = self.task.losses(self.task.prepare(batch[sl], labels[sl]), self.step)
            values.append(torch.stack([v.detach().float() for v in terms.values()]))
            for p in active:
                strategy.backward(p, losses[p.name], accum, last_micro=i == accum - 1)
        # One all-reduce per step serves the logs, the NaN check and the stop request: a NaN or a checkpoint
        # signal on any rank reaches every rank through the mean, so all stop together.
        self.timer.phase("sync")
        local = torch.stack(values)
        asked = local.new_full((1,), 1.0 if self.stop else 0.0)  # a fill: torch.tensor(x, device) would sync
        v = StepValues(self.step, list(terms), mean_over_ranks(torch.cat([local.mean(0), asked])), local,
                       sample_ids, lr)
        self.unread.append(v)
        finite = torch.isfinite(v.reduced).all() if self.deferred else None
        if not self.deferred:
            self._check_finite()  # before the optimizer step
        self.timer.phase("optim")
        for p in active:
            norm = strategy.step(p, cfg.optim.grad_clip, finite)
            if norm is not None:
                v.norms[f"grad_norm/{p.name}"] = norm
        self.timer.phase("ema")
        strategy.update_ema(self.task.model, finite)
        self.timer.stop()
        self.step += 1
        return None if self.deferred else self.read_metrics()

    def _check_finite(self) -> None:
        """Raise for the first unread step whose losses are not finite (one device-to-host copy)."""
        flags = torch.stack([torch.isfinite(u.reduced).all() for u in self.unread]).tolist()
        if all(flags):
            return
        v = self.unread[flags.index(False)]
        where = "another rank"
        bad = (~torch.isfinite(v.local)).any(1).nonzero().flatten().tolist()
        if bad:
            sl = slice(bad[0] * self.micro, (bad[0] + 1) * self.micro)
            where = f"rank {self.rank}, micro-batch {bad[0]}, sample ids {v.sample_ids[sl].tolist()}"
        late = f"; its optimizer step was skipped on the device, found at step {self.step}" if self.deferred else ""
        raise NonFiniteLossError(f"non-finite loss at step {v.step} (epoch {v.step // self.steps_per_epoch}, {where}): "
                                 + ", ".join(f"{k}={x:.4g}" for k, x in zip(v.names, v.reduced.tolist())) + late
                                 + self._reject_source(v.step))

    def _reject_source(self, step: int) -> str:
        """A checkpoint of `step` holds the very weights whose first loss was not finite: resuming it would
        fail again, so it is moved aside and a restart resumes from the one before."""
        path = os.path.join(checkpoint_root(self.run_dir), f"step_{step:08d}")
        if not os.path.isfile(os.path.join(path, MARKER)):
            return ""
        barrier()  # every rank has seen the step before rank 0 renames it
        moved = reject_checkpoint(path, f"its weights gave a non-finite loss at step {step}") if self.env.main else None
        barrier()
        return f"; checkpoint {path} produced it and was moved to {moved or 'rejected_*'}; a restart resumes from " \
               "the checkpoint before it"

    def read_metrics(self) -> dict[str, float]:
        """The newest step's metrics on the host; raises for any non-finite step since the last read and
        takes up a stop request from any rank."""
        if not self.unread:
            return self.last_read
        if self.deferred:
            self._check_finite()
        v = self.unread[-1]
        self._confirm(v.step)
        norms = [n.to(v.reduced.device, torch.float32).reshape(1) for n in v.norms.values()]
        host = torch.cat([v.reduced, *norms]).tolist()  # one copy
        n = len(v.names)
        self.stopping = host[n] > 0
        self.last_read = {**dict(zip(v.names, host[:n])), **dict(zip(v.norms, host[n + 1:])), "lr": v.lr}
        self.unread.clear()
        return self.last_read

    def timed_batches(self, batches: list[list[int]]):
        """The rank's batches, the time spent waiting for each one counted as the `data` phase."""
        it = iter(self.train_set.batches(batches, self.cfg.data.num_workers))
        try:
            while True:
                t = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                self.timer.add_host("data", time.perf_counter() - t)
                yield batch
        finally:
            if hasattr(it, "close"):  # FFCV's loader threads stop now, not when collected
                it.close()

    def evaluate(self) -> dict:
        return self.task.evaluate(self.strategy.ema_model(), self.step, self.micro)

    # -- the loop --------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.tracker.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **record})

    def fit(self) -> dict:
        handler = log_to_file(self.run_dir) if self.env.main else None
        self.tracker = Tracker(self.cfg, self.run_dir, self.env.main)
        try:
            return self._fit()
        finally:
            self.close()
            self.tracker.close()
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()

    def _save_due(self) -> tuple[bool, bool]:
        """(save now, as a milestone) after the current step."""
        c = self.cfg.checkpoint
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        milestone = bool(c.milestone_every_epochs) and offset == 0 and epoch % c.milestone_every_epochs == 0
        return milestone or bool(c.every_steps and self.step % c.every_steps == 0), milestone

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.resumed_from:
            log.info("resumed from %s at step %d", self.resumed_from, self.step)
        log.info("run %s: %d steps (%d/epoch), global batch %d, micro %d, lr %.3g, device %s, %d training samples",
                 self.run_dir, self.last_step, self.steps_per_epoch, cfg.data.global_batch, self.micro, self.peak_lr,
                 self.device, len(self.train_set))
        main = self.env.main
        bar = tqdm(total=self.last_step, initial=self.step, disable=bar_disabled(cfg.logging.progress and main),
                   desc="train", dynamic_ncols=True)
        lines = (ProgressLines(self.last_step, self.step, cfg.data.global_batch, cfg.logging.progress_every_s)
                 if main and bar.disable and cfg.logging.progress and cfg.logging.progress_every_s > 0 else None)
        last, start = {}, {}
        if cfg.eval.at_start and self.step == 0:
            start = self.evaluate()
            self._log({"step": 0, **start})
        self.timer.read()  # what set-up and the first evaluation timed is not training
        t0, step0, paused = time.perf_counter(), self.step, 0.0
        while self.step < self.last_step:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            batches = rank_batches(len(self.train_set), self.per_rank, cfg.run.seed, epoch, self.rank, self.world)
            for batch, labels, ids in self.timed_batches(batches[offset:]):
                metrics = self.train_step(batch, labels, ids)
                bar.update(1)
                if lines is not None:
                    lines.update(self.step)
                log_due = self.step % cfg.logging.log_every == 0 or self.step == self.last_step
                due, milestone = self._save_due()
                epochs_done, into_epoch = divmod(self.step, self.steps_per_epoch)
                eval_due = (into_epoch == 0 and cfg.eval.every_epochs and self.step < self.last_step
                            and epochs_done % cfg.eval.every_epochs == 0)
                if metrics is None and (log_due or due or eval_due or self.step % READ_EVERY == 0):
                    metrics = self.read_metrics()
                if log_due:
                    dt = time.perf_counter() - t0 - paused  # checkpoints and evaluations are not steps
                    metrics.update(self.throughput.record(self.step - step0, dt, self.timer.read()))
                    t0, step0, paused = time.perf_counter(), self.step, 0.0
                    last = {"step": self.step, "epoch": self.step / self.steps_per_epoch, **metrics}
                    self._log(last)
                    bar.set_postfix(loss=f"{metrics['total']:.4f}", lr=f"{metrics['lr']:.2e}")
                    if main:
                        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in last.items()))
                stop = self.stopping and self.step < self.last_step
                t_pause = time.perf_counter()
                if due or stop:  # on a stop request the checkpoint comes first: the time left is short
                    ckpt = self.save(milestone)
                if eval_due:
                    self._log({"step": self.step, **self.evaluate()})
                paused += time.perf_counter() - t_pause
                if stop:
                    bar.close()
                    log.info("stopped by the checkpoint signal at step %d; resuming from %s continues the run",
                             self.step, ckpt)
                    return {"run_dir": self.run_dir, "checkpoint": ckpt, "preempted": True, "step": self.step,
                            "signal": self.stop.signal if self.stop is not None else None}
                if self.step >= self.last_step:
                    break
        bar.close()
        ckpt = self.save(self._save_due()[1])
        final = {"step": self.step, **self.evaluate()}
        self._log(final)
        if self.env.main:
            write_done(self.run_dir, dump_config(cfg), self.step, ckpt, final)
        log.info("done: %s", " ".join(f"{k}={v}" for k, v in final.items()))
        return {"run_dir": self.run_dir, "checkpoint": ckpt, "metrics": self.metrics_path, "kernels": self.kernels,
                "last_train": last, "at_start": start, "preempted": False, **final}

