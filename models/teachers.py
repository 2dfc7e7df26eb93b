"""Frozen vision foundation-model teachers for semantic distillation (docs/reference.md §1.8), built through timm."""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .weights import RANDOM, load_state_dict_file, require_weights

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TeacherSpec:
    timm_name: str
    patch_size: int
    resize_to: int  # the image is resized to this (bilinear, antialias) before normalisation ...
    feed_size: int  # ... then to this size, which the teacher sees
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    timm_kwargs: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        """Token grid side the teacher produces; must equal the tokenizer's."""
        return self.feed_size // self.patch_size


TEACHERS = {
    # /16 teachers are fed 256 px after the 224 round trip so their grid is 16x16 like the tokenizer's.
    "dinov3-l16": TeacherSpec("vit_large_patch16_dinov3", 16, 224, 256, timm_kwargs={"img_size": 256}),
    "dinov2-l14": TeacherSpec("vit_large_patch14_dinov2", 14, 224, 224, timm_kwargs={"img_size": 224}),
    "dinov2-l14-reg4": TeacherSpec("vit_large_patch14_reg4_dinov2", 14, 224, 224, timm_kwargs={"img_size": 224}),
    "siglip2-l16": TeacherSpec("vit_large_patch16_siglip_256", 16, 224, 256, (0.5,) * 3, (0.5,) * 3,
                               timm_kwargs={"img_size": 256}),
    # The DINOv3 architecture at toy size for the CPU recipes and tests (always random weights).
    "dinov3-tiny": TeacherSpec("vit_small_patch16_dinov3", 4, 28, 32, timm_kwargs=dict(
        img_size=32, embed_dim=64, depth=2, num_heads=2)),
    "dinov3-micro": TeacherSpec("vit_small_patch16_dinov3", 4, 14, 16, timm_kwargs=dict(
        img_size=16, embed_dim=32, depth=1, num_heads=2)),
}


class Teacher(nn.Module):
    """Frozen teacher: image in [-1, 1] -> final-normed patch-token features [B, N, D]."""

    def __init__(self, name: str, weights: str | None, config_key: str = "teacher.weights",
                 compile_blocks: bool = False):
        super().__init__()
        if name not in TEACHERS:
            raise KeyError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}")
        import timm
        self.name, self.spec = name, TEACHERS[name]
        weights = require_weights(weights, f"teacher {name}", config_key)
        self.net = timm.create_model(self.spec.timm_name, pretrained=False, num_classes=0,
                                     patch_size=self.spec.patch_size, **self.spec.timm_kwargs)
        if weights == RANDOM:
            log.warning("teacher %s is randomly initialised (weights=%s): for tests only", name, RANDOM)
        else:
            self._load(load_state_dict_file(weights, f"teacher {name}"), weights)
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        if compile_blocks:
            # Per block, as the trained models (trainer/parallel/block_wrapping.py): the blocks are alike,
            # so dynamo compiles one graph for all of them (seconds, not the minute a whole ViT-L takes)
            # and fuses the norms, activations and residual adds between the matmuls of each.
            for blk in self.net.blocks:
                blk.compile(dynamic=False)

    def _load(self, sd: dict, path: str) -> None:
        try:
            self.net.load_state_dict(sd)
        except RuntimeError:
            # Original (non-timm) releases need timm's key conversion for this architecture.
            module = importlib.import_module(type(self.net).__module__)
            filt = getattr(module, "checkpoint_filter_fn", None)
            if filt is None:
                raise
            missing, unexpected = self.net.load_state_dict(filt(sd, self.net), strict=False)
            if missing or unexpected:
                raise RuntimeError(f"teacher {self.name}: {path} does not match {self.spec.timm_name}: "
                                   f"missing {missing[:5]}, unexpected {unexpected[:5]}") from None

    @property
    def dim(self) -> int:
        return self.net.embed_dim

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).float() / 255  # truncation
        x = F.interpolate(x, size=self.spec.resize_to, mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        if self.spec.feed_size != self.spec.resize_to:
            x = F.interpolate(x, size=self.spec.feed_size, mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = self.preprocess(x)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                tokens = self.net.forward_features(x)
            tokens = tokens[:, self.net.num_prefix_tokens:].float()
        return tokens.clone()  # a normal tensor: inference tensors cannot be saved for backward
