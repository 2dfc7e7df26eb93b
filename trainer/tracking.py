"""Where a run's numbers go: `metrics.jsonl` always, TensorBoard by default, wandb when asked.

Rank 0 writes; the other ranks hold a tracker that does nothing. Numbers become scalars under their
own names (`eval/psnr_ema`, `grad_norm/generator`); a value that names a PNG (`eval/grid`) becomes
an image. wandb runs offline when `logging.wandb_mode=offline` (no network needed; `wandb sync`
uploads later) and resumes the same wandb run after a restart: its id is derived from the run
directory.
"""
from __future__ import annotations

import hashlib
import json
import os

from .config import TrainConfig
from .config_tree import to_dict

METRICS = "metrics.jsonl"  # one JSON object per line: every logged record, the run's own record


class Tracker:
    def __init__(self, cfg: TrainConfig, run_dir: str, main: bool):
        self.main, self.path = main, os.path.join(run_dir, METRICS)
        self.tb = self.wandb = None
        if not main:
            return
        lc = cfg.logging
        if lc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if lc.wandb:
            try:
                import wandb
            except ImportError:
                from .config import ConfigError
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
            import wandb
            self.wandb.log({**scalars, **{k: wandb.Image(v) for k, v in images.items()}}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str, missing_ok: bool = False) -> list[dict]:
    """A run's metrics.jsonl records; [] for a run that has not logged yet when `missing_ok`."""
    try:
        with open(os.path.join(run_dir, METRICS)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        if missing_ok:
            return []
        raise


def _read_png(path: str):
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
