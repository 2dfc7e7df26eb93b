"""Rectified-flow sampling for DiT^DH (docs/reference.md §2.4): Euler on the shifted grid, CFG, AutoGuidance,
a guidance interval.

In the network t = 0 is noise and t = 1 is data; the sampler integrates dx/dt = v from 0 to 1.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from data.files import atomic_output, write_text
from models import build_model
from models.blocks import set_attention_backend
from models.noising import dimension_shift, shift_time
from trainer.config.recipes import dump_config, parse_saved_config, with_overrides
from trainer.config.schema import SampleConfig, TrainConfig
from trainer.config.tree import ConfigError
from trainer.engine.checkpoint import resolve_checkpoint
from trainer.engine.distributed import device_for, env_from_launcher, resolve_device
from trainer.engine.kernels import attention_head_dims, choose_attention
from trainer.engine.precision import autocast, autocast_dtype
from trainer.engine.tracking import bar_disabled
from trainer.evaluation.images import to_uint8_hwc
from trainer.parallel.consolidate import load_state, model_weights

from .latents import tokenizer_and_stats

log = logging.getLogger(__name__)


def time_shift_for(cfg: TrainConfig, grid: int) -> float:
    """s = sqrt(N*C/4096), never below 1 (no shift for small latents), unless set in dit.time_shift."""
    if cfg.dit.time_shift > 0:
        return cfg.dit.time_shift
    return max(1.0, dimension_shift(grid * grid, cfg.model.latent_channels))


def train_time(batch: int, s: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U(0,1), then t = 1 - s*t / (1 + (s-1)*t): biased towards the noise end (t = 0) for s > 1."""
    u = torch.rand(batch, device=device, generator=generator)
    return 1 - shift_time(u, s)


def time_grid(steps: int, s: float) -> torch.Tensor:
    """K time points from 0 (noise) to 1 (data), dense near the noise end: flip(1 - shift(linspace))."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (1 - shift_time(t, s)).flip(0)


def image_noise(indices, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise of image i depends only on (seed, i): a sample is the same whatever the batch or rank."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices])


@dataclass
class Guidance:
    kind: str = "none"          # none | cfg | autoguidance
    scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    guide: nn.Module | None = None  # AutoGuidance's weaker model

    @classmethod
    def from_config(cls, p: SampleConfig, guide: nn.Module | None = None) -> Guidance:
        return cls(p.guidance, p.scale, tuple(p.interval), guide)

    def velocity(self, model: nn.Module, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        lo, hi = self.interval
        if self.kind == "none" or not lo <= t <= hi:
            return model(x, tt, y)
        if self.kind == "cfg":
            null = torch.full_like(y, model.null_class)
            v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).chunk(2)
            return v_uncond + self.scale * (v_cond - v_uncond)
        if self.kind == "autoguidance":
            v_bad = self.guide(x, tt, y)
            return v_bad + self.scale * (model(x, tt, y) - v_bad)
        raise ValueError(f"unknown guidance {self.kind!r}")


@torch.no_grad()
def euler_sample(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, steps: int, shift: float,
                 guidance: Guidance | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Integrate from noise at t = 0 to normalised latents at t = 1 on the K-point shifted grid."""
    guidance = guidance or Guidance()
    grid = time_grid(steps, shift).tolist()
    x = noise.float()
    with autocast(x.device, dtype):
        for t, t_next in zip(grid[:-1], grid[1:]):
            x = x + (t_next - t) * guidance.velocity(model, x, t, labels).float()
    return x


# -- from checkpoints ---------------------------------------------------------------------------------

def load_dit(path: str, use_ema: bool = True, device=None) -> tuple[nn.Module, TrainConfig]:
    """A DiT^DH checkpoint written by this trainer -> (model in eval mode, its saved config)."""
    state = load_state(path)
    cfg = parse_saved_config(state["config"])
    if cfg.task != "dit":
        raise ConfigError(f"{resolve_checkpoint(path)} holds a {cfg.task!r} run, not a DiT")
    model = build_dit(cfg)
    model.load_state_dict(model_weights(state, use_ema))
    return model.to(device).eval().requires_grad_(False), cfg


def build_dit(cfg: TrainConfig) -> nn.Module:
    m = cfg.model
    return build_model(m.name, latent_channels=m.latent_channels, grid=m.image_size // m.patch_size,
                       num_classes=cfg.dit.num_classes, label_init_std=cfg.dit.label_init_std)


def load_guide(p: SampleConfig, main_cfg: TrainConfig, device) -> nn.Module | None:
    if p.guidance != "autoguidance":
        return None
    guide, gcfg = load_dit(p.guide, p.guide_use_ema, device)
    if _latent_space(gcfg) != _latent_space(main_cfg):
        raise ConfigError(f"sample.guide: {p.guide} was trained on other latents or labels (C, grid, classes, "
                          f"tokenizer = {_latent_space(gcfg)}) than the main model {_latent_space(main_cfg)}")
    return guide


def _latent_space(cfg: TrainConfig) -> tuple:
    m = cfg.model
    tokenizer = resolve_checkpoint(cfg.dit.tokenizer)
    return m.latent_channels, m.image_size // m.patch_size, cfg.dit.num_classes, tokenizer


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Image i gets class i mod K: balanced labels (50 per class for 50K at K = 1000)."""
    return torch.arange(n) % num_classes


def generate(model: nn.Module, tokenizer, stats, labels: torch.Tensor, indices, p: SampleConfig, shift: float,
             guide: nn.Module | None, device, dtype: torch.dtype | None = None, progress: bool = False
             ) -> torch.Tensor:
    """Images in [-1, 1] for `labels`, image i seeded by (p.seed, indices[i]), in batches of p.batch_size."""
    out = []
    guidance = Guidance.from_config(p, guide)
    shape = (model.latent_channels, model.grid, model.grid)
    for s in tqdm(range(0, len(labels), p.batch_size), desc="sampling", disable=bar_disabled(progress),
                  dynamic_ncols=True):
        idx = list(indices[s:s + p.batch_size])
        noise = image_noise(idx, shape, p.seed).to(device)
        z = euler_sample(model, noise, labels[s:s + p.batch_size].to(device), p.steps, shift, guidance, dtype)
        out.append(tokenizer.decode(stats.denormalize(z)).cpu())
    return torch.cat(out)


def write_samples(out_dir: str, images: torch.Tensor, labels: torch.Tensor, indices) -> dict:
    """PNG per image and one .npz (ADM/FID-tool layout: arr_0 uint8 [N, H, W, 3], plus labels)."""
    os.makedirs(out_dir, exist_ok=True)
    arr = to_uint8_hwc(images)
    for a, i in zip(arr, indices):
        Image.fromarray(a).save(os.path.join(out_dir, f"{int(i):06d}.png"))
    npz = os.path.join(out_dir, "samples.npz")
    with atomic_output(npz) as tmp:  # the name ends in .npz: np.savez keeps it
        np.savez(tmp, arr_0=arr, labels=labels.numpy())
    return {"dir": out_dir, "npz": npz, "count": len(arr)}


@dataclass
class Sampler:
    """A DiT checkpoint ready to sample: the model, its tokenizer and statistics, the guide."""
    cfg: TrainConfig
    model: nn.Module
    tokenizer: nn.Module
    stats: object
    guide: nn.Module | None
    device: torch.device
    shift: float
    dtype: torch.dtype | None

    def __call__(self, labels: torch.Tensor, indices, progress: bool = False, sample: SampleConfig | None = None
                 ) -> torch.Tensor:
        """`sample`: other sampler settings than the checkpoint's (a guidance scale sweep)."""
        return generate(self.model, self.tokenizer, self.stats, labels, indices, sample or self.cfg.sample,
                        self.shift, self.guide, self.device, self.dtype, progress)

    def settings(self) -> dict:
        """What decides the samples, recorded next to every number computed from them."""
        p = self.cfg.sample
        return {"steps": p.steps, "guidance": p.guidance, "scale": p.scale, "interval": list(p.interval),
                "seed": p.seed, "shift": self.shift, "guide": p.guide if p.guidance == "autoguidance" else None}


def load_sampler(checkpoint: str, overrides: list[str], use_ema: bool = True) -> Sampler:
    """A DiT checkpoint with its saved config, `overrides` (sample.*, run.device, eval.*) applied."""
    model, saved = load_dit(checkpoint, use_ema)  # checks that it is a DiT run
    cfg = with_overrides(saved, overrides)
    device = device_for(env_from_launcher(), resolve_device(cfg.run.device))  # under torchrun: GPU LOCAL_RANK
    model.to(device)
    tok, stats = tokenizer_and_stats(cfg, device)
    guide = load_guide(cfg.sample, cfg, device)
    modules = [m for m in (model, tok, guide) if m is not None]
    attn, why = choose_attention(cfg.parallel.attention, device, attention_head_dims(modules))
    set_attention_backend(attn)
    log.info("sampling: attention %s (%s)", attn, why)
    return Sampler(cfg, model, tok, stats, guide, device, time_shift_for(cfg, model.grid),
                   autocast_dtype(cfg.parallel.precision, device))


def sample_from_checkpoint(checkpoint: str, overrides: list[str], out_dir: str, num_images: int,
                           labels: list[int] | None = None, use_ema: bool = True) -> dict:
    """`rectok sample`: images from a DiT checkpoint, its tokenizer and statistics, with `sample.*`
    (or `run.device`) overridden; writes PNGs, samples.npz and the resolved config used."""
    sampler = load_sampler(checkpoint, overrides, use_ema)
    cfg = sampler.cfg
    y = torch.tensor(labels) if labels else balanced_labels(num_images, cfg.dit.num_classes)
    if int(y.max()) >= cfg.dit.num_classes or int(y.min()) < 0:
        raise ConfigError(f"labels must lie in [0, {cfg.dit.num_classes}), got {y.tolist()}")
    images = sampler(y, range(len(y)), progress=True)
    info = write_samples(out_dir, images, y, range(len(y)))
    write_text(os.path.join(out_dir, "sample_config.yaml"),
               f"# samples of {resolve_checkpoint(checkpoint)} ({'EMA' if use_ema else 'raw'} weights)\n"
               + dump_config(cfg))
    return {**info, "images": images, "labels": y}
