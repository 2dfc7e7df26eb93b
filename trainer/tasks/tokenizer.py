"""RecTok stage 1 (FSD + RAD pretraining) and stage 2 (pixel-decoder fine-tuning): models and losses.

The generic loop (trainer/engine/loop.py) owns optimisation; this file says what is trained and how the
loss of one micro-batch is formed (docs/reference.md §1.3-1.11).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from data import evenly_spaced, load_batch, sequential_batches, to_model_range
from models import build_model
from models.losses import NETWORK, PatchGAN, PerceptualLoss, generator_adv_loss, hinge_d_loss, semantic_loss
from models.noising import expected_kept_fraction, num_kept, random_keep_ids, sample_fsd_t, sample_mask_ratio
from models.rectok import DiagonalGaussian, without_semantic_decoder
from models.teachers import Teacher
from trainer.config.schema import TrainConfig, uses_teacher
from trainer.engine.memory import compile_enabled
from trainer.engine.precision import autocast, autocast_dtype
from trainer.engine.protocols import TrainedModule
from trainer.evaluation.fidelity import TrackedFID
from trainer.evaluation.images import psnr, save_grid, to_uint8_images
from trainer.parallel.consolidate import load_state, model_weights

from .splits import open_split

log = logging.getLogger(__name__)


class TokenizerTask:
    def __init__(self, cfg: TrainConfig, device: torch.device, main: bool = True):
        self.cfg, self.device, self.main = cfg, device, main
        self.stage = cfg.tokenizer.stage
        self.train_set, self.val_set = open_split(cfg, "train"), open_split(cfg, "val")
        self.fid = TrackedFID(cfg, device)
        self.autocast_dtype = autocast_dtype(cfg.parallel.precision, device)
        cuda = device.type == "cuda"
        self.teacher = None
        if uses_teacher(cfg):
            self.teacher = Teacher(cfg.teacher.name, cfg.teacher.weights,
                                   compile_blocks=cuda and compile_enabled(cfg.parallel.compile, device)).to(device)
        semantic = {"semantic_decoder": "none"}
        if self.teacher is not None:
            semantic = {"semantic_decoder": cfg.model.semantic_decoder, "teacher_dim": self.teacher.dim}
        self.model = build_model(cfg.model.name, latent_channels=cfg.model.latent_channels,
                                 image_size=cfg.model.image_size, patch_size=cfg.model.patch_size,
                                 **semantic).to(device)
        if self.stage == 2:
            self._init_stage2(None if cfg.data.synthetic else cfg.tokenizer.init_from, cfg.tokenizer.init_use_ema)
        lw = cfg.loss
        self.perceptual = None
        if lw.perceptual_weight > 0:
            # On CUDA the frozen LPIPS-VGG16 and ConvNeXt-S run in the run's precision, NHWC (cuDNN's fast
            # layout); a CPU keeps them fp32 and NCHW, as the tests and demo measured them.
            self.perceptual = PerceptualLoss(lw.lpips_vgg_weights, lw.convnext_weights, lw.convnext_weight,
                                             lw.convnext_size, autocast_dtype=self.autocast_dtype if cuda else None,
                                             channels_last=cuda).to(device)
        self.trained_modules = [TrainedModule("generator", self.model)]
        self.disc = None
        if lw.gan_weight > 0:
            self.disc = PatchGAN().to(device)
            self.trained_modules.append(TrainedModule("discriminator", self.disc, lw.disc_start_epoch))

    def _init_stage2(self, path: str | None, use_ema: bool) -> None:
        """Stage 2: stage-1 weights (random ones with synthetic data), everything frozen but the pixel
        decoder (docs/reference.md §1.11)."""
        if path is not None:
            state = load_state(path)
            self.model.load_state_dict(without_semantic_decoder(model_weights(state, use_ema)))
            log.info("stage 2: loaded %s weights from %s", "EMA" if use_ema else "raw", path)
        self.model.encoder.requires_grad_(False)

    def train_flops_per_sample(self) -> int:
        """Model FLOPs of one training image in the networks being trained (docs/reference.md §6: 258 GFLOP
        at C = 128): forward + backward (3x forward) of the encoder on the expected RAD-kept tokens, the pixel decoder
        and the semantic decoder; stage 2 runs its frozen encoder forward only. The teacher, perceptual
        networks and discriminator run too but are not counted, as in the paper's figure."""
        m, tk = self.model, self.cfg.tokenizer
        if self.stage == 1:
            encoder = 3 * m.encoder.flops(kept=round(expected_kept_fraction(tk.mask_ratio_min, tk.mask_ratio_max)
                                                       * m.num_tokens))
        else:
            encoder = m.encoder.flops()
        semantic = m.semantic_decoder.flops() if m.semantic_decoder is not None else 0
        return encoder + 3 * (m.decoder.flops() + semantic)

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor]:
        images = to_model_range(images, self.device)
        if self.cfg.data.hflip:
            flip = torch.rand(images.shape[0], device=self.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return (images,)

    def losses(self, inputs: tuple[torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One micro-batch of images in [-1, 1] -> ({player: loss}, {term: value}), all fp32 scalars."""
        (x,) = inputs
        cfg, tk, lw = self.cfg, self.cfg.tokenizer, self.cfg.loss
        n = self.model.num_tokens
        ids_keep = None  # stage 2: no masking
        terms: dict[str, torch.Tensor] = {}
        if self.stage == 1:
            keep = num_kept(n, sample_mask_ratio(tk.mask_ratio_min, tk.mask_ratio_max))
            # r = 0 still takes the masked path, keeping every token: all ranks then run the same graph and
            # the mask tokens get a zero gradient, not none (FSDP2 and ZeRO reduce only what has one).
            ids_keep = random_keep_ids(x.shape[0], n, keep, device=x.device) if keep < n else \
                torch.arange(n, device=x.device).expand(x.shape[0], n)
            terms["kept_frac"] = x.new_full((), keep / n, dtype=torch.float32)  # a fill, not a host-to-device copy
        t = None
        if self.stage == 1 and tk.gamma > 0:
            t = sample_fsd_t(x.shape[0], tk.t_schedule, n, cfg.model.latent_channels, device=x.device)
        with record_function(f"{NETWORK}generator"), autocast(self.device, self.autocast_dtype):
            moments, rec, sem = self.model(x, ids_keep, fsd_t=t, gamma=tk.gamma, train_encoder=self.stage == 1)
        posterior = DiagonalGaussian(moments)
        # Losses in fp32, on [0, 1] images (docs/reference.md §1.9).
        rec01, x01 = rec.float() * 0.5 + 0.5, x.float() * 0.5 + 0.5
        total = torch.zeros((), device=x.device)
        terms["rec"] = F.mse_loss(rec01, x01)
        total = total + lw.rec_weight * terms["rec"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(rec01, x01)  # labels its LPIPS and ConvNeXt parts
            total = total + lw.perceptual_weight * terms["perceptual"]
        if lw.kl_weight > 0:
            terms["kl"] = posterior.kl()
            total = total + lw.kl_weight * terms["kl"]
        if sem is not None:
            with record_function(f"{NETWORK}teacher"):
                target = self.teacher(x)
            terms["semantic"] = semantic_loss(sem, target)
            total = total + lw.semantic_weight * terms["semantic"]
        losses = {}
        if self.disc is not None and step >= self.trained_modules[1].start_step:
            # D's parameters may be bf16 (DeepSpeed bf16)
            with record_function(f"{NETWORK}discriminator"), autocast(self.device, self.autocast_dtype):
                real, fake = self.disc(x01), self.disc(rec01.detach())  # first: DDP sets up on D's first call
                self.disc.requires_grad_(False)  # the generator's term must not touch D's gradients
                fake_g = self.disc(rec01)
                self.disc.requires_grad_(True)
            terms["gan_g"] = generator_adv_loss(fake_g.float())
            total = total + lw.gan_weight * terms["gan_g"]
            terms["gan_d"] = hinge_d_loss(real.float(), fake.float())
            losses["discriminator"] = terms["gan_d"]
        losses["generator"] = total
        terms["total"] = total
        return losses, terms

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.autocast_dtype):
            return model.reconstruct(x).float()

    @torch.no_grad()
    def evaluate(self, ema_model: nn.Module, step: int, batch_size: int) -> dict:
        """PSNR of raw and EMA reconstructions on validation images, and a picture of them."""
        cfg, n = self.cfg, len(self.val_set)
        models = {"raw": self.model, "ema": ema_model}
        self.model.eval()
        scores = {k: [] for k in models}
        ids = evenly_spaced(n, min(n, cfg.eval.num_images or n))  # the val set is sorted by class
        for images, _, _ in self.val_set.batches(sequential_batches(ids, batch_size), cfg.data.num_workers):
            x = to_model_range(images, self.device)
            for k, m in models.items():
                scores[k].append(psnr(self.reconstruct(m, x) * 0.5 + 0.5, x * 0.5 + 0.5).cpu())
        grid_images = load_batch(self.val_set, evenly_spaced(n, cfg.eval.grid_images), cfg.data.num_workers)[0]
        x = to_model_range(grid_images, self.device)
        pairs = torch.stack([x, self.reconstruct(ema_model, x)], dim=1).flatten(0, 1).cpu()
        out = {f"eval/psnr_{k}": torch.cat(v).mean().item() for k, v in scores.items()}
        if cfg.eval.fid_images:  # rFID of EMA reconstructions, as `rectok eval tokenizer` computes it
            picks = evenly_spaced(n, min(cfg.eval.fid_images, n))

            def reconstructions(ids: list[int]) -> torch.Tensor:
                x = load_batch(self.val_set, [picks[i] for i in ids], cfg.data.num_workers)[0]
                return to_uint8_images(self.reconstruct(ema_model, to_model_range(x, self.device)))
            out[f"eval/rfid{len(picks)}"] = self.fid(len(picks), reconstructions, batch_size)
        if self.main:
            out["eval/grid"] = save_grid(os.path.join(cfg.run_dir, "eval", f"recon_step{step:08d}.png"), pairs)
        self.model.train()
        return out

