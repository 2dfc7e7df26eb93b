"""DiT^DH rectified-flow training on RecTok latents (docs/reference.md §2.3), cached or encoded on the fly.

The generic loop (trainer/engine/loop.py) owns optimisation; this file turns a loader batch into
normalised posterior samples and forms the velocity loss.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from data import evenly_spaced, sequential_batches, to_model_range
from data.synthetic import synthetic_latents
from trainer.config.recipes import parse_saved_config
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError
from trainer.engine.checkpoint import resolve_checkpoint
from trainer.engine.precision import autocast, autocast_dtype
from trainer.engine.protocols import TrainedModule
from trainer.evaluation.classifier import class_accuracy
from trainer.evaluation.fidelity import TrackedFID
from trainer.evaluation.images import save_grid, to_uint8_images
from trainer.parallel.consolidate import load_state, model_weights

from .class_judge import load_class_judge
from .latents import LatentCache, LatentStats, cache_dir_for, check_labels, tokenizer_and_stats
from .sampling import balanced_labels, build_dit, generate, load_guide, time_shift_for, train_time
from .splits import open_split

log = logging.getLogger(__name__)


class DiTTask:
    def __init__(self, cfg: TrainConfig, device: torch.device, main: bool = True):
        self.cfg, self.device, self.main = cfg, device, main
        self.online = cfg.dit.latents == "online" and not cfg.data.synthetic
        if cfg.data.synthetic:  # no tokenizer: evaluation computes losses, but cannot decode samples
            m = cfg.model
            self.tokenizer, self.stats = None, LatentStats([0.0] * m.latent_channels, [1.0] * m.latent_channels, device)
            self.train_set = synthetic_latents(m.latent_channels, m.image_size // m.patch_size,
                                               num_classes=cfg.dit.num_classes)
        else:
            images = open_split(cfg, "train") if self.online else None
            if images is not None:  # refused before the tokenizer loads and its statistics are computed
                check_labels(images, cfg.dit.num_classes)
            self.tokenizer, self.stats = tokenizer_and_stats(cfg, device, images)
            if images is None:
                images = LatentCache(cache_dir_for(cfg), self.tokenizer.hash)
                check_labels(images, cfg.dit.num_classes)
            self.train_set = images
        self.model = build_dit(cfg).to(device)
        if cfg.dit.init_from and not cfg.data.synthetic:
            self._init_from(cfg.dit.init_from, cfg.dit.init_use_ema)
        self.trained_modules = [TrainedModule("generator", self.model)]
        self.shift = time_shift_for(cfg, self.model.grid)
        self.autocast_dtype = autocast_dtype(cfg.parallel.precision, device)
        self.guide = None if cfg.data.synthetic else load_guide(cfg.sample, cfg, device)
        self.fid = TrackedFID(cfg, device)
        # made by prepare_class_judge before the task is built (trainer/tasks/training.py)
        self.judge, _ = load_class_judge(cfg, device) if cfg.eval.class_images else (None, None)
        log.info("DiT %s: %.2fM parameters, latents %s (%d samples), time shift %.3f", cfg.model.name,
                 self.model.param_counts()["total"] / 1e6, "encoded online" if self.online else "from the cache",
                 len(self.train_set), self.shift)

    def _init_from(self, path: str, use_ema: bool) -> None:
        """Fine-tuning: the weights of a DiT checkpoint (ours or imported) of the same model and latents."""
        state = load_state(path)
        saved, m = parse_saved_config(state["config"]), self.cfg.model
        if (saved.task, saved.model.name, saved.model.latent_channels, saved.dit.num_classes) != (
                "dit", m.name, m.latent_channels, self.cfg.dit.num_classes):
            raise ConfigError(f"dit.init_from: {resolve_checkpoint(path)} holds {saved.model.name} (C = "
                              f"{saved.model.latent_channels}, {saved.dit.num_classes} classes), this run trains "
                              f"{m.name} (C = {m.latent_channels}, {self.cfg.dit.num_classes} classes)")
        self.model.load_state_dict(model_weights(state, use_ema))
        log.info("DiT: started from the %s weights of %s", "EMA" if use_ema else "raw", resolve_checkpoint(path))

    def train_flops_per_sample(self) -> int:
        """Model FLOPs of one training image: forward + backward = 3x the DiT's forward (docs/reference.md §6)."""
        return 3 * self.model.flops_per_sample()["total"]

    # -- inputs ------------------------------------------------------------------------------------
    def moments(self, batch: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar) [B, C, h, w] of each image, mirrored where `flip`: read from the
        cache's two stored flips, or encoded now from the (mirrored) images."""
        if self.online:
            images = to_model_range(batch, self.device)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            return self.tokenizer.moments(images)
        m = batch.to(self.device, non_blocking=True)  # [B, flip, (mean, logvar), C, h, w] bf16
        chosen = m[torch.arange(m.shape[0], device=self.device), flip.long()].float()
        return chosen[:, 0], chosen[:, 1]

    def prepare(self, batch: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loader batch -> (normalised posterior samples z, labels): a flip bit and eps drawn on the device."""
        b = batch.shape[0]
        flip = torch.zeros(b, dtype=torch.bool, device=self.device)
        if self.cfg.data.hflip and generator is None:
            flip = torch.rand(b, device=self.device) < 0.5
        mean, logvar = self.moments(batch, flip)
        eps = torch.randn(mean.shape, device=self.device, generator=generator)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.stats.normalize(z), labels.to(self.device, non_blocking=True)

    # -- loss -----------------------------------------------------------------------------------------
    def flow_loss(self, model: nn.Module, z: torch.Tensor, y: torch.Tensor, drop: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t = t*z + (1-t)*noise with shifted t; target z - noise; label -> null with p = label_drop."""
        b = z.shape[0]
        t = train_time(b, self.shift, device=self.device, generator=generator)
        if drop and self.cfg.dit.label_drop > 0:
            y = torch.where(torch.rand(b, device=self.device) < self.cfg.dit.label_drop,
                            torch.full_like(y, model.null_class), y)
        noise = torch.randn(z.shape, device=self.device, generator=generator)
        tt = t.view(-1, 1, 1, 1)
        with autocast(self.device, self.autocast_dtype):
            v = model(tt * z + (1 - tt) * noise, t, y)
        return F.mse_loss(v.float(), z - noise)

    def losses(self, inputs: tuple[torch.Tensor, torch.Tensor], step: int):
        z, y = inputs
        loss = self.flow_loss(self.model, z, y)
        return {"generator": loss}, {"loss": loss, "total": loss}

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fixed_inputs(self, count: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same samples, flips and posterior draws at every evaluation (a smooth loss curve)."""
        n = len(self.train_set)
        ids = evenly_spaced(n, min(n, count or n))
        g = torch.Generator(device=self.device).manual_seed(1234)
        return [self.prepare(batch, labels, generator=g) for batch, labels, _ in
                self.train_set.batches(sequential_batches(ids, batch_size), self.cfg.data.num_workers)]

    @torch.no_grad()
    def fixed_loss(self, model: nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The flow loss of `model` on fixed inputs with fixed noise and times, no label drop."""
        g = torch.Generator(device=self.device).manual_seed(4321)
        total = sum(self.flow_loss(model, z, y, drop=False, generator=g).item() * len(z) for z, y in inputs)
        return total / sum(len(z) for z, _ in inputs)

    @torch.no_grad()
    def evaluate(self, ema_model: nn.Module, step: int, batch_size: int) -> dict:
        cfg = self.cfg
        self.model.eval()
        inputs = self.fixed_inputs(cfg.eval.num_images, batch_size)  # encoded once for both models
        out = {"eval/loss_raw": self.fixed_loss(self.model, inputs),
               "eval/loss_ema": self.fixed_loss(ema_model, inputs)}
        if self.tokenizer is None:
            self.model.train()
            return out
        # One set of samples serves the grid and the class judge: image i (label i mod K, noise seeded by i)
        # is the same image in both, so the grid's images are the first of the judged ones.
        judged = cfg.eval.class_images if self.judge is not None else 0
        labels = balanced_labels(max(cfg.eval.grid_images, judged), cfg.dit.num_classes)
        images = generate(ema_model, self.tokenizer, self.stats, labels, range(len(labels)), cfg.sample, self.shift,
                          self.guide, self.device, self.autocast_dtype)
        if self.main:
            out["eval/grid"] = save_grid(os.path.join(cfg.run_dir, "eval", f"samples_step{step:08d}.png"),
                                         images[:cfg.eval.grid_images])
        if judged:  # do the samples show their class? (the sampler as configured)
            out["eval/class_accuracy"] = class_accuracy(self.judge.predict(images[:judged]),
                                                        labels[:judged])["class_accuracy"]
        if cfg.eval.fid_images:  # gFID of EMA samples, as `rectok eval generator` computes it
            labels = balanced_labels(cfg.eval.fid_images, cfg.dit.num_classes)

            def samples(idx: list[int]) -> torch.Tensor:
                return to_uint8_images(generate(ema_model, self.tokenizer, self.stats, labels[idx], idx, cfg.sample,
                                                self.shift, self.guide, self.device, self.autocast_dtype))
            out[f"eval/gfid{cfg.eval.fid_images}"] = self.fid(cfg.eval.fid_images, samples, cfg.sample.batch_size)
        self.model.train()
        return out
