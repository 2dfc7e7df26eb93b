"""Where a run's numbers and log lines go: `metrics.jsonl` always, TensorBoard by default, wandb when
asked; Python logging to the console (rank 0 speaks for all) and to RUN/train.log.

Rank 0 writes; the other ranks hold a tracker that does nothing. Numbers become scalars under their
own names (`eval/psnr_ema`, `grad_norm/generator`); a value that names a PNG (`eval/grid`) becomes
an image. wandb runs offline when `logging.wandb_mode=offline` (no network needed; `wandb sync`
uploads later) and resumes the same wandb run after a restart: its id is derived from the run
directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
from PIL import Image

from data.files import write_text
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError, to_dict

log = logging.getLogger("rectok")

METRICS = "metrics.jsonl"  # one JSON object per line: every logged record, the run's own record


class Tracker:
    def __init__(self, cfg: TrainConfig, run_dir: str, main: bool):
        self.main, self.path = main, os.path.join(run_dir, METRICS)
        self.tb = self.wandb = None
        if not main:
            return
        lc = cfg.logging
        if lc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow to import (tensorboard): only when used
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if lc.wandb:
            try:
                import wandb  # optional extra: imported where used
            except ImportError:
                raise ConfigError("logging.wandb: true, but wandb is not installed (pip install wandb)") from None
            run_id = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]
            self.wandb = wandb.init(project=lc.wandb_project, name=cfg.run.name, id=run_id, resume="allow",
                                    dir=run_dir, mode=lc.wandb_mode, config=to_dict(cfg))

    def log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        images = {k: v for k, v in record.items() if isinstance(v, str) and v.endswith(".png") and os.path.isfile(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            for k, v in images.items():
                self.tb.add_image(k, _read_png(v), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb  # optional extra, installed when self.wandb exists
            self.wandb.log({**scalars, **{k: wandb.Image(v) for k, v in images.items()}}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate_metrics(run_dir: str, step: int) -> int:
    """Drops the records past `step` (a resumed run logs those steps again); returns how many."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            pass  # a line cut short by a kill mid-write
    if len(kept) < len(lines):
        write_text(path, "".join(kept))
        log.info("metrics.jsonl: %d records past step %d dropped (they are logged again)", len(lines) - len(kept), step)
    return len(lines) - len(kept)


def read_metrics(run_dir: str, missing_ok: bool = False) -> list[dict]:
    """A run's metrics.jsonl records; [] for a run that has not logged yet when `missing_ok`. A line that
    is not JSON (cut short by a kill mid-write) is skipped with a warning: the others still count."""
    path = os.path.join(run_dir, METRICS)
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if len(records) < len(lines):
        log.warning("%s: %d line(s) that are not JSON skipped (cut short by a kill mid-write?)", path,
                    len(lines) - len(records))
    return records


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def configure_logging(main_rank: bool) -> None:
    """INFO from rank 0, warnings from the others (rank 0 speaks for all)."""
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def log_to_file(run_dir: str) -> logging.Handler:
    """Every log line of this process also goes to RUN/train.log until the handler is removed."""
    handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def bar_disabled(wanted: bool) -> bool | None:
    """tqdm's `disable` for a progress bar: when wanted, drawn only if stderr is a terminal (tqdm's None),
    so a Slurm log or a pipe never fills with bar redraws."""
    return None if wanted else True


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressLines:
    """Where no bar is drawn (off a terminal): a log line every `every_s` seconds with the step, the
    images per second since the last line and the time left at that rate."""

    def __init__(self, total: int, start: int, images_per_step: int, every_s: float, clock=time.monotonic):
        self.total, self.images_per_step, self.every_s, self.clock = total, images_per_step, every_s, clock
        self.t, self.step = clock(), start

    def update(self, step: int) -> str | None:
        now = self.clock()
        if now - self.t < self.every_s or step == self.step:
            return None
        steps_per_s = (step - self.step) / max(now - self.t, 1e-9)
        left = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
        line = (f"progress: step {step}/{self.total} ({100 * step / self.total:.1f}%), "
                f"{steps_per_s * self.images_per_step:.1f} img/s, {_duration(left)} left")
        log.info(line)
        self.t, self.step = now, step
        return line
