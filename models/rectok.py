"""The RecTok tokenizer: ViT encoder, KL posterior, pixel decoder and tiny semantic decoder
(docs/reference.md §1.3-1.7)."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import (
    RMS_EPS,
    VIT_SIZES,
    Block,
    block_flops,
    gather_tokens,
    init_trunc_normal,
    scatter_tokens,
    tokenizer_rope_table,
)
from .noising import fsd_noise

LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian:
    """Posterior from the latent head's [mean | logvar] output."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=-1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def kl(self) -> torch.Tensor:
        """0.5 * sum(mean^2 + var - 1 - logvar) over the (kept) tokens and channels, batch-averaged."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(1).mean()


class _TokenGrid(nn.Module):
    """A ViT trunk over an H x W token grid with learned APE and the tokenizer RoPE."""

    def __init__(self, size: str, grid: int):
        super().__init__()
        cfg = VIT_SIZES[size]
        self.width, self.num_tokens = cfg.width, grid * grid
        self.positional_embedding = nn.Parameter(torch.randn(1, self.num_tokens, cfg.width) * cfg.width ** -0.5)
        self.ln_pre = nn.RMSNorm(cfg.width, eps=RMS_EPS)
        self.transformer = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.ln_post = nn.RMSNorm(cfg.width, eps=RMS_EPS)
        # Recomputed, never saved: checkpoints do not hold RoPE tables (docs/reference.md §1.2).
        self.register_buffer("rope", tokenizer_rope_table(cfg.head_dim, grid, grid), persistent=False)

    def run_blocks(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = self.ln_pre(x)
        for blk in self.transformer:
            x = blk(x, rope)
        return self.ln_post(x)

    def trunk_flops(self, tokens: int) -> int:
        return len(self.transformer) * block_flops(self.width, tokens)


class Encoder(_TokenGrid):
    def __init__(self, size: str, latent_channels: int, image_size: int, patch_size: int):
        grid = image_size // patch_size
        super().__init__(size, grid)
        self.patch_size, self.latent_channels = patch_size, latent_channels
        self.patch_embed = nn.Conv2d(3, self.width, patch_size, stride=patch_size)
        self.latent_head = nn.Linear(self.width, 2 * latent_channels)
        init_trunc_normal(self)
        for blk in self.transformer:
            blk.varying_tokens = True  # the RAD-kept tokens: a different count every step

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, 3, H, W] in [-1, 1]; ids_keep: [B, K] tokens kept by RAD masking (None = all) ->
        [B, K, 2C] moments (mean | logvar). Tensors, not the posterior object: FSDP2 hooks backward
        onto the tensors a sharded module returns."""
        # .float(): the residual stream stays fp32 where a strategy keeps this parameter in bf16 (DeepSpeed)
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.positional_embedding.float()
        rope = self.rope
        if ids_keep is not None:
            x, rope = gather_tokens(x, ids_keep), gather_tokens(self.rope, ids_keep)
        return self.latent_head(self.run_blocks(x, rope))

    def flops(self, kept: int | None = None) -> int:
        """Forward FLOPs per image; `kept` tokens after RAD dropping (all by default)."""
        n, d, p = self.num_tokens, self.width, self.patch_size
        k = n if kept is None else kept
        return 2 * n * 3 * p * p * d + 2 * k * d * 2 * self.latent_channels + self.trunk_flops(k)


def unpatchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, p*p*3, h, w] with channel order (p1, p2, c), c fastest -> [B, 3, h*p, w*p]."""
    b, _, h, w = x.shape
    x = x.view(b, patch, patch, 3, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, 3, h * patch, w * patch)


class PixelDecoder(_TokenGrid):
    def __init__(self, size: str, latent_channels: int, image_size: int, patch_size: int):
        grid = image_size // patch_size
        super().__init__(size, grid)
        self.grid, self.patch_size, self.latent_channels = grid, patch_size, latent_channels
        self.decoder_embed = nn.Linear(latent_channels, self.width)
        self.mask_token = nn.Parameter(torch.randn(self.width) * self.width ** -0.5)
        self.ffn = nn.Conv2d(self.width, patch_size * patch_size * 3, 1)
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        init_trunc_normal(self)

    def forward(self, z: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """z: [B, K, C] latents of kept tokens (all N when ids_keep is None) -> image [B, 3, H, W]."""
        x = self.decoder_embed(z)
        if ids_keep is not None:
            x = scatter_tokens(x, ids_keep, self.mask_token, self.num_tokens)
        x = self.run_blocks(x + self.positional_embedding.float(), self.rope)
        x = x.transpose(1, 2).reshape(x.shape[0], self.width, self.grid, self.grid)
        return self.conv_out(unpatchify(self.ffn(x), self.patch_size))

    def flops(self) -> int:
        n, d, p = self.num_tokens, self.width, self.patch_size
        pixels = n * p * p
        return 2 * n * (self.latent_channels * d + d * p * p * 3) + 2 * pixels * 27 * 3 + self.trunk_flops(n)


class SemanticDecoder(_TokenGrid):
    """Tiny transformer predicting teacher features for all N tokens from the (noised, masked) latent."""

    def __init__(self, latent_channels: int, teacher_dim: int, grid: int, size: str = "tiny"):
        super().__init__(size, grid)
        self.latent_channels, self.teacher_dim = latent_channels, teacher_dim
        self.token_embedding = nn.Linear(latent_channels, self.width)
        self.mask_embedding = nn.Parameter(torch.zeros(self.width))
        self.out = nn.Linear(self.width, teacher_dim)
        # PyTorch default initialisation is kept on purpose (docs/reference.md §1.7).

    def forward(self, z: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(z)
        if ids_keep is not None:
            x = scatter_tokens(x, ids_keep, self.mask_embedding, self.num_tokens)
        return self.out(self.run_blocks(x + self.positional_embedding.float(), self.rope))

    def flops(self) -> int:
        n, d = self.num_tokens, self.width
        return 2 * n * (self.latent_channels * d + d * self.teacher_dim) + self.trunk_flops(n)


class MLPSemanticDecoder(nn.Module):
    """Per-token MLP variant for the decoder ablations (paper Tables 7/10)."""

    def __init__(self, latent_channels: int, teacher_dim: int, grid: int, hidden: int = 1024):
        super().__init__()
        self.num_tokens, self.latent_channels, self.teacher_dim = grid * grid, latent_channels, teacher_dim
        self.token_embedding = nn.Linear(latent_channels, hidden)
        self.mask_embedding = nn.Parameter(torch.zeros(hidden))
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, teacher_dim))

    def forward(self, z: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(z)
        if ids_keep is not None:
            x = scatter_tokens(x, ids_keep, self.mask_embedding, self.num_tokens)
        return self.mlp(x)

    def flops(self) -> int:
        h = self.token_embedding.out_features
        return 2 * self.num_tokens * (self.latent_channels * h + h * h + h * self.teacher_dim)


SEMANTIC_DECODERS = ("transformer", "mlp", "none")


def without_semantic_decoder(state: dict) -> dict:
    """A RecTok state dict minus the semantic decoder, which only stage-1 training uses."""
    return {k: v for k, v in state.items() if not k.startswith("semantic_decoder.")}


class RecTok(nn.Module):
    """Encoder + pixel decoder (+ semantic decoder during stage 1). Single-device code."""

    def __init__(self, encoder_size: str = "base", decoder_size: str = "base", latent_channels: int = 128,
                 image_size: int = 256, patch_size: int = 16, semantic_decoder: str = "transformer",
                 teacher_dim: int = 1024):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.latent_channels, self.image_size, self.patch_size = latent_channels, image_size, patch_size
        self.grid = image_size // patch_size
        self.encoder = Encoder(encoder_size, latent_channels, image_size, patch_size)
        self.decoder = PixelDecoder(decoder_size, latent_channels, image_size, patch_size)
        if semantic_decoder == "transformer":
            self.semantic_decoder = SemanticDecoder(latent_channels, teacher_dim, self.grid)
        elif semantic_decoder == "mlp":
            self.semantic_decoder = MLPSemanticDecoder(latent_channels, teacher_dim, self.grid)
        elif semantic_decoder == "none":
            self.semantic_decoder = None
        else:
            raise ValueError(f"semantic_decoder must be one of {SEMANTIC_DECODERS}, got {semantic_decoder!r}")

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def no_weight_decay(self) -> set[str]:
        """Parameter-name suffixes that AdamW must not decay besides 1-D tensors (docs/reference.md §1.10)."""
        return {"positional_embedding", "mask_token", "mask_embedding"}

    def encode(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> DiagonalGaussian:
        return DiagonalGaussian(self.encoder(x, ids_keep))

    def decode(self, z: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z, ids_keep)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, fsd_t: torch.Tensor | None = None,
                gamma: float = 0.0, train_encoder: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The training path (one call, so data-parallel wrappers see it): encode the kept tokens, sample
        the posterior, FSD-noise it at `fsd_t` (docs/reference.md §1.4), decode pixels and teacher features.
        Returns (moments, reconstruction, semantic features or None): plain tensors, for FSDP2's hooks."""
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            moments = self.encoder(x, ids_keep)
        z = DiagonalGaussian(moments).sample()
        if fsd_t is not None:
            z = fsd_noise(z, fsd_t, gamma)
        semantic = self.semantic_decoder(z, ids_keep) if self.semantic_decoder is not None else None
        return moments, self.decode(z, ids_keep), semantic

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation path: no mask, posterior mean, clamped to [-1, 1]."""
        return self.decode(self.encode(x).mean).clamp(-1, 1)

    def flops_per_sample(self) -> dict[str, int]:
        out = {"encoder": self.encoder.flops(), "pixel_decoder": self.decoder.flops()}
        if self.semantic_decoder is not None:
            out["semantic_decoder"] = self.semantic_decoder.flops()
        out["total"] = sum(out.values())
        return out

    def param_counts(self) -> dict[str, int]:
        parts = {"encoder": self.encoder, "pixel_decoder": self.decoder}
        if self.semantic_decoder is not None:
            parts["semantic_decoder"] = self.semantic_decoder
        out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        out["total"] = sum(out.values())
        return out
