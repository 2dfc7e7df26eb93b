"""Importing the released RecTok / DiT^DH checkpoints (docs/reference.md §7) and exporting them back.

The released files cannot be downloaded here, so the tests write state dicts with the released key layout
and shapes by hand from docs/reference.md §7 (random values; full sizes on the meta device), and check the quirky parts
of the released computation against references written here from the released maths (einops rearranges,
`get_rope_tensor`, EVA's VisionRotaryEmbeddingFast), not through our modules.
"""
from __future__ import annotations

import argparse
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from models.released_layout import (
    OfficialLayoutError,
    check_layout,
    dit_from_official,
    dit_to_official,
    tokenizer_from_official,
    tokenizer_to_official,
)
from models.weights import UnreadableWeightsError, read_checkpoint
from trainer.cli import main

TINY = (192, 3, 4)  # ViT tiny: width, depth, heads
DIT_T = ((128, 2, 4), (192, 2, 4))


# -- the released layout, by hand from docs/reference.md §7 ------------------------------------------------------------

def vit_layout(prefix: str, width: int, depth: int) -> dict:
    h = int(2 / 3 * 4 * width)
    out = {f"{prefix}ln_pre.weight": (width,), f"{prefix}ln_post.weight": (width,)}
    for i in range(depth):
        b = f"{prefix}transformer.{i}."
        out.update({b + "norm1.weight": (width,), b + "norm2.weight": (width,),
                    b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                    b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                    b + "mlp.w12.weight": (2 * h, width), b + "mlp.w12.bias": (2 * h,),
                    b + "mlp.w3.weight": (width, h), b + "mlp.w3.bias": (width,)})
    return out


def tokenizer_layout(c: int, enc=(768, 12), dec=(768, 12), image=256, patch=16, teacher=None, prefix="sem_"):
    n, e, d = (image // patch) ** 2, enc[0], dec[0]
    out = {"encoder.patch_embed.0.weight": (e, 3, patch, patch), "encoder.patch_embed.0.bias": (e,),
           "encoder.positional_embedding": (1, n, e), **vit_layout("encoder.", *enc),
           "encoder.latent_head.weight": (2 * c, e), "encoder.latent_head.bias": (2 * c,),
           "decoder.positional_embedding": (1, n, d), "decoder.mask_token": (1, 1, d),
           "decoder.decoder_embed.weight": (d, c), "decoder.decoder_embed.bias": (d,), **vit_layout("decoder.", *dec),
           "decoder.ffn.1.weight": (patch * patch * 3, d, 1, 1), "decoder.ffn.1.bias": (patch * patch * 3,),
           "decoder.conv_out.weight": (3, 3, 3, 3), "decoder.conv_out.bias": (3,)}
    if teacher:
        name, dim = teacher
        s = f"{prefix}decoders.{name}."
        out.update({s + "token_embedding.weight": (192, c), s + "token_embedding.bias": (192,),
                    s + "mask_embedding": (1, 1, 192), s + "positional_embedding": (1, n, 192),
                    **vit_layout(s, 192, 3), s + "out.weight": (dim, 192), s + "out.bias": (dim,)})
        t = f"{prefix}foundation_models.{name}."  # a few of the frozen teacher's tensors
        out.update({t + "embeddings.patch_embeddings.weight": (dim, 3, 16, 16), t + "norm.weight": (dim,)})
    return out


def eva_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA's VisionRotaryEmbeddingFast buffers, as the released DDT code builds them."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    f = (torch.arange(grid) / grid * grid)[:, None] * freqs[None]
    f = f.repeat_interleave(2, dim=-1)  # '... n -> ... (n r)', r=2
    f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
    return f.cos().reshape(-1, head_dim), f.sin().reshape(-1, head_dim)


def dit_layout(trunk, head, c: int, grid: int, classes: int) -> dict:
    (tw, td, th), (hw, hd, hh) = trunk, head
    n = grid * grid
    out = {"pos_embed": (1, n, tw), "s_embedder.proj.weight": (tw, c, 1, 1), "s_embedder.proj.bias": (tw,),
           "x_embedder.proj.weight": (hw, c, 1, 1), "x_embedder.proj.bias": (hw,),
           "s_projector.weight": (hw, tw), "s_projector.bias": (hw,), "t_embedder.W": (256,),
           "t_embedder.mlp.0.weight": (tw, 512), "t_embedder.mlp.0.bias": (tw,),
           "t_embedder.mlp.2.weight": (tw, tw), "t_embedder.mlp.2.bias": (tw,),
           "y_embedder.embedding_table.weight": (classes + 1, tw),
           "final_layer.norm_final.weight": (hw,), "final_layer.linear.weight": (c, hw),
           "final_layer.linear.bias": (c,),
           "final_layer.adaLN_modulation.1.weight": (2 * hw, hw), "final_layer.adaLN_modulation.1.bias": (2 * hw,),
           "enc_feat_rope.freqs_cos": (n, tw // th), "enc_feat_rope.freqs_sin": (n, tw // th),
           "dec_feat_rope.freqs_cos": (n, hw // hh), "dec_feat_rope.freqs_sin": (n, hw // hh)}
    for i in range(td + hd):
        w, b = (tw if i < td else hw), f"blocks.{i}."
        h = int(2 / 3 * 4 * w)
        out.update({b + "norm1.weight": (w,), b + "norm2.weight": (w,), b + "attn.qkv.weight": (3 * w, w),
                    b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                    b + "mlp.w12.weight": (2 * h, w), b + "mlp.w12.bias": (2 * h,), b + "mlp.w3.weight": (w, h),
                    b + "mlp.w3.bias": (w,), b + "adaLN_modulation.1.weight": (6 * w, w),
                    b + "adaLN_modulation.1.bias": (6 * w,)})
    return out


def filled(layout: dict, seed: int = 0) -> dict:
    """Random values: norm weights near 1, matrices scaled by their fan-in (activations stay O(1)), the rest
    small; RoPE buffers hold their real tables."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        t = torch.randn(shape, generator=g)
        if ".norm" in k or ".ln_" in k:
            out[k] = 1 + 0.1 * t
        else:
            out[k] = t * (math.prod(shape[1:]) ** -0.5 if len(shape) >= 2 and shape[0] > 1 else 0.2)
    for name in ("enc_feat_rope", "dec_feat_rope"):
        if f"{name}.freqs_cos" in layout:
            n, hd = layout[f"{name}.freqs_cos"]
            out[f"{name}.freqs_cos"], out[f"{name}.freqs_sin"] = eva_tables(hd, math.isqrt(n))
    return out


def on_meta(layout: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in layout.items()}


# -- layouts at full size (meta) and tiny size (values) -------------------------------------------------------

@pytest.mark.quick
@pytest.mark.parametrize("teacher", [None, ("dinov3", 1024)])
def test_full_size_tokenizer_layout_round_trip(teacher):
    layout = tokenizer_layout(128, teacher=teacher)
    if teacher is None:
        assert len(layout) == 257  # docs/reference.md §7: the generation-time module
    c = tokenizer_from_official(on_meta(layout))
    assert c.arch == {"name": "RecTok-BB", "latent_channels": 128, "image_size": 256, "patch_size": 16,
                      "semantic_decoder": "transformer" if teacher else "none",
                      **({"teacher_dim": 1024} if teacher else {})}
    with torch.device("meta"):
        check_layout(c.build(), c)
    back = tokenizer_to_official(c.state, "dinov3")
    kept = {k: v for k, v in layout.items() if "foundation_models" not in k}
    assert {k: tuple(v.shape) for k, v in back.items()} == kept
    if teacher:
        assert any("frozen teacher weights dropped: 2 tensors of dinov3" in n for n in c.notes)


@pytest.mark.quick
@pytest.mark.parametrize("size,params", [("S", 193.6e6), ("B", 291.2e6), ("L", 618.5e6), ("XL", 835.3e6)])
def test_full_size_dit_layouts(size, params):
    from models.registry import DIT_SIZES
    layout = dit_layout(*DIT_SIZES[size], c=128, grid=16, classes=1000)
    c = dit_from_official(on_meta(layout))  # the size is read from the tensors
    assert c.arch == {"name": f"DiTDH-{size}", "latent_channels": 128, "grid": 16, "num_classes": 1000}
    assert sum(t.numel() for t in c.state.values()) == pytest.approx(params, abs=0.05e6)  # docs/reference.md §2.1
    with torch.device("meta"):
        check_layout(c.build(), c)
    with pytest.raises(OfficialLayoutError, match=f"--size B, but the file holds DiTDH-{size}") if size != "B" else \
            contextlib.nullcontext():
        dit_from_official(on_meta(layout), "B")


@pytest.mark.quick
def test_tiny_round_trip_keeps_every_tensor():
    sd = filled(tokenizer_layout(8, TINY[:2], TINY[:2], 32, 8, ("dinov3", 32), prefix="aux_"))  # older names
    c = tokenizer_from_official(sd)
    back = tokenizer_to_official(c.state, "dinov3")
    kept = {k.replace("aux_", "sem_"): v for k, v in sd.items() if "foundation_models" not in k}
    assert back.keys() == kept.keys()
    assert all(torch.equal(back[k], kept[k]) for k in kept)
    d = filled(dit_layout(*DIT_T, c=8, grid=4, classes=10))
    back = dit_to_official(dit_from_official(d).state, "DiTDH-T")
    assert back.keys() == d.keys()
    for k in d:
        torch.testing.assert_close(back[k], d[k], atol=1e-6, rtol=0)  # RoPE: recomputed in fp64


# -- the released computation, by hand ---------------------------------------------------------------------

def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def rotate_half(x):
    x1, x2 = rearrange(x, "... (d r) -> ... d r", r=2).unbind(-1)
    return rearrange(torch.stack((-x2, x1), -1), "... d r -> ... (d r)")


def tokenizer_rope(dim: int, g: int) -> torch.Tensor:
    """The released get_rope_tensor: [N, 2*dim] = concat(cos, sin)."""
    f = 7.0 * (7.0 / 7e-4) ** torch.linspace(0, -1, dim // 4)
    f = torch.cat([f, f])
    freqs = torch.zeros(2, dim)
    freqs[0, : dim // 2], freqs[1, -dim // 2:] = f, f
    angle = torch.cartesian_prod(torch.linspace(0, 1, g), torch.linspace(0, 1, g)) @ (freqs * 2 * torch.pi)
    return torch.cat([angle.cos(), angle.sin()], -1)


def attention(sd, p, x, heads, rope):
    q, k, v = rearrange(F.linear(x, sd[p + "qkv.weight"], sd[p + "qkv.bias"]), "b n (qkv h d) -> qkv b h n d",
                        qkv=3, h=heads).unbind(0)
    q, k = rope(q), rope(k)
    a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
    return F.linear(rearrange(a, "b h n d -> b n (h d)"), sd[p + "proj.weight"], sd[p + "proj.bias"])


def mlp(sd, p, x):
    gate, value = F.linear(x, sd[p + "w12.weight"], sd[p + "w12.bias"]).chunk(2, -1)
    return F.linear(F.silu(gate) * value, sd[p + "w3.weight"], sd[p + "w3.bias"])


def vit(sd, p, x, heads, table):
    """ln_pre, blocks with the tokenizer RoPE (apply_rotary_emb), ln_post; `table` [B, N, 2D]."""
    cos, sin = table.unsqueeze(1).chunk(2, -1)
    rope = lambda t: t * cos + rotate_half(t) * sin  # noqa: E731
    x = rms(x, sd[p + "ln_pre.weight"])
    i = 0
    while f"{p}transformer.{i}.norm1.weight" in sd:
        b = f"{p}transformer.{i}."
        x = x + attention(sd, b + "attn.", rms(x, sd[b + "norm1.weight"]), heads, rope)
        x = x + mlp(sd, b + "mlp.", rms(x, sd[b + "norm2.weight"]))
        i += 1
    return rms(x, sd[p + "ln_post.weight"])


def restore(x, mask_token, ids_restore):
    """The released decoders' masking: append mask tokens, gather back to grid order."""
    b, k, d = x.shape
    x = torch.cat([x, mask_token.repeat(b, ids_restore.shape[1] - k, 1)], 1)
    return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))


def official_tokenizer(sd, img, patch, heads, ids_keep=None, ids_restore=None):
    g = img.shape[-1] // patch
    table = tokenizer_rope(sd["encoder.positional_embedding"].shape[-1] // heads, g).expand(img.shape[0], -1, -1)
    x = rearrange(F.conv2d(img, sd["encoder.patch_embed.0.weight"], sd["encoder.patch_embed.0.bias"], stride=patch),
                  "b c h w -> b (h w) c") + sd["encoder.positional_embedding"]
    enc_table = table
    if ids_keep is not None:
        x = torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, x.shape[-1]))
        enc_table = torch.gather(table, 1, ids_keep[..., None].repeat(1, 1, table.shape[-1]))
    z = F.linear(vit(sd, "encoder.", x, heads, enc_table), sd["encoder.latent_head.weight"],
                 sd["encoder.latent_head.bias"])
    mean = z.chunk(2, -1)[0]
    y = F.linear(mean, sd["decoder.decoder_embed.weight"], sd["decoder.decoder_embed.bias"])
    if ids_restore is not None:
        y = restore(y, sd["decoder.mask_token"], ids_restore)
    y = vit(sd, "decoder.", y + sd["decoder.positional_embedding"], heads, table)
    y = F.conv2d(rearrange(y, "b (h w) c -> b c h w", h=g), sd["decoder.ffn.1.weight"], sd["decoder.ffn.1.bias"])
    y = rearrange(y, "b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=patch, p2=patch)
    image = F.conv2d(y, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)
    s = "sem_decoders.dinov3."
    sem = F.linear(mean, sd[s + "token_embedding.weight"], sd[s + "token_embedding.bias"])
    if ids_restore is not None:
        sem = restore(sem, sd[s + "mask_embedding"], ids_restore)
    sem = vit(sd, s, sem + sd[s + "positional_embedding"], TINY[2],
              tokenizer_rope(192 // TINY[2], g).expand(img.shape[0], -1, -1))
    return z, image, F.linear(sem, sd[s + "out.weight"], sd[s + "out.bias"])


@pytest.mark.quick
def test_tokenizer_forward_matches_the_released_computation():
    """Tokenizer RoPE (block-repeated frequencies, row/column halves), fused qkv, SwiGLU halves, latent head
    halves, mask-token restore and the pixel shuffle's (p1, p2, c) order, with and without RAD masking."""
    torch.manual_seed(0)
    sd = filled(tokenizer_layout(8, TINY[:2], TINY[:2], 32, 8, ("dinov3", 32)))
    c = tokenizer_from_official(sd)
    model = c.build()
    model.load_state_dict(c.state)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    shuffle = torch.argsort(torch.rand(2, 16), dim=1)
    keep = shuffle[:, :11]
    for ids_keep, ids_restore in ((None, None), (keep, torch.argsort(shuffle, dim=1))):
        z, image, sem = official_tokenizer(sd, img, 8, TINY[2], ids_keep, ids_restore)
        with torch.no_grad():
            moments = model.encoder(img, ids_keep)
            mean = moments.chunk(2, -1)[0]
            torch.testing.assert_close(moments, z, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(model.decoder(mean, ids_keep), image, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(model.semantic_decoder(mean, ids_keep), sem, atol=1e-4, rtol=1e-4)


def official_dit(sd, x, t, y, trunk, head):
    """The released DiTwDDTHead.net: t = 0 noise, 1 data; the head modulated per token by s."""
    proj = t[:, None] * sd["t_embedder.W"][None, :] * 2 * torch.pi
    temb = torch.cat([proj.sin(), proj.cos()], -1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = F.silu(temb + sd["y_embedder.embedding_table.weight"][y])

    def block(i, h, cond, heads, rope_name):
        b = f"blocks.{i}."
        cos, sin = sd[f"{rope_name}.freqs_cos"], sd[f"{rope_name}.freqs_sin"]
        rope = lambda q: q * cos + rotate_half(q) * sin  # noqa: E731
        mod = F.linear(F.silu(cond if cond.dim() == 3 else cond[:, None]), sd[b + "adaLN_modulation.1.weight"],
                       sd[b + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, -1)
        h = h + g1 * attention(sd, b + "attn.", rms(h, sd[b + "norm1.weight"]) * (1 + sc1) + sh1, heads, rope)
        return h + g2 * mlp(sd, b + "mlp.", rms(h, sd[b + "norm2.weight"]) * (1 + sc2) + sh2)

    s = rearrange(F.conv2d(x, sd["s_embedder.proj.weight"], sd["s_embedder.proj.bias"]), "B C H W -> B (H W) C")
    s = s + sd["pos_embed"]
    for i in range(trunk[1]):
        s = block(i, s, c, trunk[2], "enc_feat_rope")
    s = F.linear(F.silu(temb[:, None].repeat(1, s.shape[1], 1) + s), sd["s_projector.weight"], sd["s_projector.bias"])
    h = rearrange(F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"]), "B C H W -> B (H W) C")
    for i in range(trunk[1], trunk[1] + head[1]):
        h = block(i, h, s, head[2], "dec_feat_rope")
    shift, scale = F.linear(F.silu(s), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, -1)
    h = F.linear(rms(h, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift, sd["final_layer.linear.weight"],
                 sd["final_layer.linear.bias"])
    g = x.shape[-1]
    return torch.einsum("nhwpqc->nchpwq", h.reshape(x.shape[0], g, g, 1, 1, -1)).reshape(x.shape)


@pytest.mark.quick
def test_dit_forward_matches_the_released_computation():
    """EVA RoPE, time embedding (t = 0 noise), label + time conditioning of the trunk, time-only s for the
    head, per-token adaLN in the head and final layer: every modulation weight non-zero."""
    sd = filled(dit_layout(*DIT_T, c=8, grid=4, classes=10), seed=1)
    c = dit_from_official(sd)
    model = c.build()
    model.load_state_dict(c.state)
    x, t, y = torch.randn(3, 8, 4, 4), torch.tensor([0.0, 0.37, 1.0]), torch.tensor([1, 10, 4])  # 10 = null class
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), official_dit(sd, x, t, y, *DIT_T),
                                   atol=1e-4, rtol=1e-4)


# -- bad files ---------------------------------------------------------------------------------------------

@pytest.mark.quick
def test_layout_errors_name_the_keys():
    sd = on_meta(tokenizer_layout(16, TINY[:2], TINY[:2], 32, 8))
    sd.pop("decoder.ffn.1.bias")
    sd["encoder.extra.weight"] = torch.empty(3, device="meta")
    sd["decoder.conv_out.weight"] = torch.empty(3, 3, 5, 5, device="meta")
    c = tokenizer_from_official(sd)
    with pytest.raises(OfficialLayoutError) as e, torch.device("meta"):
        check_layout(c.build(), c)
    msg = str(e.value)
    assert "1 missing: decoder.ffn.1.bias" in msg and "1 unexpected: encoder.extra.weight" in msg
    assert "decoder.conv_out.weight: (3, 3, 5, 5) in the file, (3, 3, 3, 3) expected" in msg
    d = on_meta(dit_layout(*DIT_T, c=8, grid=4, classes=10))
    d["enc_feat_rope.freqs_cos"] = torch.empty(16, 16, device="meta")
    with pytest.raises(OfficialLayoutError,
                       match=r"enc_feat_rope.freqs_cos: \(16, 16\) in the file, \(16, 32\) expected"):
        dit_from_official(d)
    d = filled(dit_layout(*DIT_T, c=8, grid=4, classes=10))
    d["dec_feat_rope.freqs_sin"] = d["dec_feat_rope.freqs_sin"].flip(0)
    with pytest.raises(OfficialLayoutError, match="dec_feat_rope.freqs_sin: differs from the EVA RoPE table"):
        dit_from_official(d)


@pytest.mark.quick
def test_unreadable_files_fail_clearly(tmp_path, capsys):
    path = tmp_path / "RecTok.pth"
    torch.save({"model": filled(tokenizer_layout(8, TINY[:2], TINY[:2], 32, 8))}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableWeightsError, match="may be truncated"):
        read_checkpoint(str(path), "official RecTok checkpoint")
    assert main(["import-official", "--tokenizer", str(path), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "official RecTok checkpoint: cannot read" in err and str(path) in err
    torch.save({"model": {"a": torch.ones(1)}, "gen": torch.Generator()}, tmp_path / "odd.pth")
    with pytest.raises(UnreadableWeightsError, match="torch._C.Generator.*--trust-pickle"):
        read_checkpoint(str(tmp_path / "odd.pth"), "x")
    assert main(["import-official", "--tokenizer", str(tmp_path / "missing.pth")]) == 2
    assert "weights file not found" in capsys.readouterr().err
    # Files are memory-mapped; the pre-1.6 (non-zip) format cannot be, and is read whole.
    torch.save({"a": torch.arange(3.0)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(str(tmp_path / "legacy.pt"), "x")["a"], torch.arange(3.0))


# -- end to end: import, use like our runs, export back -------------------------------------------------------

def test_import_sample_finetune_and_export(tmp_path, dataset_dir, capsys):
    tok_sd = filled(tokenizer_layout(8, TINY[:2], TINY[:2], 32, 8, ("dinov3", 32)), seed=2)
    raw = {k: v + 0.01 for k, v in tok_sd.items()}
    torch.save({"model": raw, "model_ema": tok_sd, "args": argparse.Namespace(epochs=200)}, tmp_path / "RecTok.pth")
    dit = filled(dit_layout(*DIT_T, c=8, grid=4, classes=10), seed=3)
    torch.save({"model_ema": dit}, tmp_path / "DiTDH-T.pth")
    torch.save(filled(dit_layout(*DIT_T, c=8, grid=4, classes=10), seed=4), tmp_path / "guide.pth")
    out = tmp_path / "runs"
    common = [f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16", "data.num_workers=0",
              "model.image_size=32", "model.patch_size=8", "teacher.name=dinov3-micro", "logging.progress=false"]
    argv = ["import-official", "--tokenizer", str(tmp_path / "RecTok.pth"), "--tokenizer-config", "rectok/tiny_stage1",
            "--dit", str(tmp_path / "DiTDH-T.pth"), "--size", "T", "--guide", str(tmp_path / "guide.pth"),
            "--guide-config", "dit/tiny_dit", "--out", str(out)] + common
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2 and "already holds a checkpoint; --force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    tok_run, dit_run, guide_run = out / "RecTok", out / "DiTDH-T", out / "guide"

    # Sampling: statistics computed on first use, AutoGuidance by the imported guide at w = 1.29.
    from trainer.tasks.sampling import load_sampler
    sampler = load_sampler(str(dit_run), ["sample.steps=3"])
    assert (sampler.cfg.sample.guidance, sampler.cfg.sample.scale, sampler.cfg.sample.guide) == (
        "autoguidance", 1.29, str(guide_run))
    assert sampler.guide is not None and sampler.tokenizer.path.startswith(str(tok_run))
    assert main(["sample", str(dit_run), "--out", str(tmp_path / "samples"), "--num-images", "4",
                 "sample.steps=3"]) == 0
    assert (tmp_path / "samples" / "samples.npz").is_file()

    # Training in an imported run directory would resume without optimizer state: refused, with the way out.
    assert main(["train", str(dit_run / "config.yaml"), "run.max_steps=1", "dit.latents=online"]) == 2
    assert f"dit.init_from={dit_run}" in capsys.readouterr().err

    # Fine-tuning starts from the imported weights: DiT (dit.init_from) and tokenizer stage 2 (EMA, teacher-free).
    from trainer.config.recipes import load_config
    from trainer.tasks.dit import DiTTask
    from trainer.tasks.tokenizer import TokenizerTask
    cfg = load_config("dit/tiny_dit", common + [f"dit.tokenizer={tok_run}", f"dit.init_from={dit_run}",
                                                "model.latent_channels=8", "dit.latents=online"])
    task = DiTTask(cfg, torch.device("cpu"))
    assert torch.equal(task.model.blocks[0].attn.qkv.weight, dit["blocks.0.attn.qkv.weight"])
    cfg = load_config("rectok/tiny_stage2", common + [f"tokenizer.init_from={tok_run}", "model.latent_channels=8",
                                                      "loss.convnext_size=32"])
    task = TokenizerTask(cfg, torch.device("cpu"))
    assert torch.equal(task.model.decoder.mask_token, tok_sd["decoder.mask_token"].reshape(-1))

    # Export back: the same tensors under the same names (the teacher is not ours to write).
    assert main(["export", str(tok_run), "--official", "--out", str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    for got, want in ((back["model"], raw), (back["model_ema"], tok_sd)):
        want = {k: v for k, v in want.items() if "foundation_models" not in k}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["export", str(dit_run), "--official", "--out", str(tmp_path / "dit_back.pth")]) == 0
    back = torch.load(tmp_path / "dit_back.pth", weights_only=True)["model_ema"]
    assert back.keys() == dit.keys()
    for k in dit:
        torch.testing.assert_close(back[k], dit[k], atol=1e-6, rtol=0)


@pytest.mark.quick
def test_dit_import_needs_its_tokenizer(tmp_path, capsys):
    torch.save(filled(dit_layout(*DIT_T, c=8, grid=4, classes=10)), tmp_path / "d.pth")
    assert main(["import-official", "--dit", str(tmp_path / "d.pth"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "import it alongside (--tokenizer FILE) or name an imported one (dit.tokenizer=RUN)" in err
