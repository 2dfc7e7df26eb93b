"""The DiT^DH generator: a DiT trunk with a wide, shallow "DDT" head (docs/reference.md §2.1-2.2; key names §7).

Module and parameter names are the released checkpoint's, so a released state dict loads with
strict=True; the only released tensors we do not hold are the RoPE tables, which we recompute and
keep as non-persistent buffers (as the tokenizer does, docs/reference.md §1.2). The fixed tensors the
released files hold (Fourier weights, position embedding) are persistent buffers, saved under the same
keys: buffers are never trained, sharded or cast by FSDP2's param_dtype or DeepSpeed's bf16, so they
stay fp32 under every strategy.

Naming follows the DDT code: `s` is the trunk ("encoder") stream, `x` the head ("decoder") stream.
Time convention: t = 0 is noise, t = 1 is data (docs/reference.md §2.2, the opposite of the tokenizer's FSD).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import RMS_EPS, Block, block_flops

FOURIER_FEATURES = 256


def eva_rope_table(head_dim: int, grid: int, theta: float = 10000.0) -> torch.Tensor:
    """EVA-style 2-D RoPE table [grid*grid, 2*head_dim] = concat(cos, sin), for `blocks.apply_rope`.

    Unlike the tokenizer's table this is an exact rotation: frequencies are pair-interleaved
    ([f0, f0, f1, f1, ...]) to match rotate_half_pairs, so attention scores depend only on the
    relative offset. Integer positions 0..grid-1; the first half of the head dim rotates with the
    row, the second half with the column; tokens row-major (EVA's VisionRotaryEmbeddingFast).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    dim = head_dim // 2  # per axis
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [dim/2]
    pos = torch.arange(grid, dtype=torch.float64)
    angle = (pos[:, None] * freqs).repeat_interleave(2, dim=-1)  # [grid, dim], pair-interleaved
    row = angle[:, None, :].expand(grid, grid, dim)
    col = angle[None, :, :].expand(grid, grid, dim)
    angle = torch.cat([row, col], dim=-1).reshape(grid * grid, head_dim)
    return torch.cat([angle.cos(), angle.sin()], dim=-1).float()


def sincos_pos_embed_2d(width: int, grid: int) -> torch.Tensor:
    """[grid*grid, width]: the DiT repo's get_2d_sincos_pos_embed, in torch.

    Replicated quirk included: its meshgrid puts the column (w) coordinate first, so the first
    width/2 channels encode the column and the second half the row; each half is [sin | cos].
    """
    if width % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {width}")
    half = width // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2.0))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # row-major tokens

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=-1)

    return torch.cat([one_d(cols), one_d(rows)], dim=-1).float()


class FourierTimeEmbedder(nn.Module):
    """t -> [sin(2 pi t W), cos(2 pi t W)] -> Linear -> SiLU -> Linear.

    W is fixed but saved (it is in the released checkpoints): a persistent buffer, fp32 under every strategy.
    """

    def __init__(self, width: int, features: int = FOURIER_FEATURES):
        super().__init__()
        self.register_buffer("W", torch.randn(features))
        self.mlp = nn.Sequential(nn.Linear(2 * features, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        proj = 2 * math.pi * t.float()[:, None] * self.W[None, :]
        return self.mlp(torch.cat([proj.sin(), proj.cos()], dim=-1))


class LabelEmbedder(nn.Module):
    """num_classes + 1 rows; the last row is the null class. Label dropout is the trainer's job."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Patch-1 embedding: 1x1 conv [B, C, H, W] -> tokens [B, H*W, width], row-major."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(Block):
    """The tokenizer's block (RMSNorm, attention with qkv bias and RoPE, SwiGLU) with adaLN-Zero:
    six modulation chunks.

    `cond` is [B, W] (trunk: one modulation per sample, broadcast over tokens) or [B, N, W]
    (head: a modulation per token).
    """

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(cond)
        if mod.dim() == 2:
            mod = mod.unsqueeze(1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """RMSNorm, per-token (shift, scale) from s (no gate), Linear to the latent channels."""

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.norm_final = nn.RMSNorm(width, eps=RMS_EPS)
        self.linear = nn.Linear(width, channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTDH(nn.Module):
    """v(x, t, y): velocity of the rectified flow from noise (t = 0) to data (t = 1). Single-device code.

    x: [B, C, grid, grid]; t: [B] (or a scalar) in [0, 1]; y: [B] long, `null_class` = unconditional.
    """

    def __init__(self, trunk_width: int, trunk_depth: int, trunk_heads: int, latent_channels: int = 128,
                 grid: int = 16, num_classes: int = 1000, head_width: int = 2048, head_depth: int = 2,
                 head_heads: int = 16, label_init_std: float = 0.02):
        super().__init__()
        for name, w, h in (("trunk", trunk_width, trunk_heads), ("head", head_width, head_heads)):
            if w % h:
                raise ValueError(f"{name} width {w} is not a multiple of its {h} heads")
        self.latent_channels, self.grid, self.num_classes = latent_channels, grid, num_classes
        self.label_init_std = label_init_std
        self.null_class = num_classes
        self.trunk_width, self.trunk_depth, self.trunk_heads = trunk_width, trunk_depth, trunk_heads
        self.head_width, self.head_depth, self.head_heads = head_width, head_depth, head_heads

        self.t_embedder = FourierTimeEmbedder(trunk_width)
        self.y_embedder = LabelEmbedder(num_classes, trunk_width)
        self.s_embedder = PatchEmbed(latent_channels, trunk_width)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(trunk_width, grid).unsqueeze(0))  # fixed, saved
        self.x_embedder = PatchEmbed(latent_channels, head_width)  # no position embedding: RoPE only
        # The released model swaps in nn.Identity when the widths agree; none of the sizes does.
        self.s_projector = nn.Linear(trunk_width, head_width)
        self.blocks = nn.ModuleList(
            [DiTBlock(trunk_width, trunk_heads) for _ in range(trunk_depth)]
            + [DiTBlock(head_width, head_heads) for _ in range(head_depth)])
        self.final_layer = FinalLayer(head_width, latent_channels)
        # Recomputed, never saved (the released files hold them as enc/dec_feat_rope.freqs_{cos,sin}).
        self.register_buffer("enc_feat_rope", eva_rope_table(trunk_width // trunk_heads, grid), persistent=False)
        self.register_buffer("dec_feat_rope", eva_rope_table(head_width // head_heads, grid), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """docs/reference.md §2.2: every adaLN output layer and the final Linear start at zero, so v = 0 at init.
        The label table starts at std 0.02 (DiT's) unless `label_init_std` says otherwise: a few hundred
        steps move its rows by about lr * steps, so on a short run 0.02 leaves the classes nearly the same
        row and guidance nothing to amplify (the CPU demo's recipe starts them apart)."""
        for emb in (self.s_embedder, self.x_embedder):
            w = emb.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear, not as a conv
            nn.init.zeros_(emb.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.label_init_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [blk.adaLN_modulation[-1] for blk in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def trunk(self) -> nn.ModuleList:
        return self.blocks[:self.trunk_depth]

    @property
    def head(self) -> nn.ModuleList:
        return self.blocks[self.trunk_depth:]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        if (ch, h, w) != (self.latent_channels, self.grid, self.grid):
            raise ValueError(f"expected latents [B, {self.latent_channels}, {self.grid}, {self.grid}], "
                             f"got {list(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        t_emb = self.t_embedder(t)  # [B, D]
        c = F.silu(t_emb + self.y_embedder(y))  # [B, D]; the blocks' adaLN applies SiLU again
        s = self.s_embedder(x) + self.pos_embed
        for blk in self.trunk:
            s = blk(s, c, self.enc_feat_rope)
        s = self.s_projector(F.silu(t_emb.unsqueeze(1) + s))  # [B, N, head]: time only, not the label
        x = self.x_embedder(x)
        for blk in self.head:
            x = blk(x, s, self.dec_feat_rope)
        x = self.final_layer(x, s)  # [B, N, C]
        # contiguous: a copy, not a view (FSDP2 warns that an in-place op on a returned view skips its hooks)
        return x.transpose(1, 2).reshape(b, ch, h, w).contiguous()

    def param_counts(self) -> dict[str, int]:
        """embed: t/y embedders, s_embedder, pos_embed; head: s_projector, x_embedder, head blocks.

        Fixed saved tensors (pos_embed, t_embedder.W) count, as in the paper's totals; RoPE tables (not
        saved) do not.
        """
        def n(*mods: nn.Module | torch.Tensor) -> int:
            return sum(m.numel() if isinstance(m, torch.Tensor) else sum(v.numel() for v in m.state_dict().values())
                       for m in mods)

        out = {"trunk": n(self.trunk), "head": n(self.s_projector, self.x_embedder, self.head),
               "embed": n(self.t_embedder, self.y_embedder, self.s_embedder, self.pos_embed),
               "final": n(self.final_layer)}
        out["total"] = sum(out.values())
        return out

    def flops_per_sample(self) -> dict[str, int]:
        """Forward FLOPs (2 per multiply-add) of the matmuls; biases, norms and activations left out.

        Trunk adaLN runs once per sample; head and final-layer adaLN run on every token. Grouped as
        param_counts, with the embedders and the final layer under `other`.
        """
        n, d, hw, ch = self.num_tokens, self.trunk_width, self.head_width, self.latent_channels
        trunk = self.trunk_depth * (block_flops(d, n) + 2 * d * 6 * d)
        head = (2 * n * (d * hw + ch * hw)  # s_projector, x_embedder
                + self.head_depth * (block_flops(hw, n) + 2 * n * hw * 6 * hw))
        other = (2 * (2 * FOURIER_FEATURES * d + d * d)  # time MLP, once per sample
                 + 2 * n * ch * d  # s_embedder
                 + 2 * n * (hw * 2 * hw + hw * ch))  # final adaLN (per token) and linear
        return {"trunk": trunk, "head": head, "other": other, "total": trunk + head + other}
