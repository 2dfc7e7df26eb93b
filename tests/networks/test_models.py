"""Shapes, exact parameter counts and the quirks of the released tokenizer (docs/reference.md §1.1-1.7)."""
import math

import pytest
import torch

from models import build_model
from models.blocks import apply_rope, tokenizer_rope_table
from models.rectok import DiagonalGaussian, unpatchify

pytestmark = pytest.mark.quick


def meta_model(name="RecTok-BB", **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


def test_exact_parameter_counts_at_c128():
    counts = meta_model(latent_channels=128, teacher_dim=1024).param_counts()
    assert counts["encoder"] == 86_033_920
    assert counts["pixel_decoder"] == 85_936_980
    assert counts["semantic_decoder"] == 1_606_336


@pytest.mark.parametrize("c", [16, 32, 64, 128])
def test_latent_dims_change_only_the_latent_layers(c):
    counts = meta_model(latent_channels=c).param_counts()
    assert counts["encoder"] == 86_033_920 - 768 * 2 * (128 - c) - 2 * (128 - c)
    assert counts["pixel_decoder"] == 85_936_980 - 768 * (128 - c)


def test_forward_flops_close_to_paper_multiply_adds():
    flops = meta_model(latent_channels=128).flops_per_sample()
    # Paper Table 3: 44.4 G multiply-adds for encoder + decoder; ours counts attention matmuls too.
    macs = (flops["encoder"] + flops["pixel_decoder"]) / 2
    assert 44.4e9 < macs < 44.4e9 * 1.06


def test_training_step_flops_match_spec():
    """docs/reference.md §6: 258 GFLOP per image in the trained networks (forward + backward = 3x forward), with
    the encoder seeing E[kept] = 84% of the tokens under RAD masking."""
    m = meta_model(latent_channels=128)
    fwd = m.encoder.flops(kept=round(0.84 * 256)) + m.decoder.flops() + m.semantic_decoder.flops()
    assert abs(3 * fwd / 258e9 - 1) < 0.01


def reference_rope_table(d, h, w):
    """docs/reference.md §1.2 written out element by element in float64."""
    f = [7.0 * (7.0 / 7e-4) ** (-(i / (d // 4 - 1))) for i in range(d // 4)]
    f2 = f + f
    rows = []
    for k in range(h * w):
        r, c = k // w, k % w
        yr, xc = r / (h - 1), c / (w - 1)
        ang = [2 * math.pi * fi * yr for fi in f2] + [2 * math.pi * fi * xc for fi in f2]
        rows.append([math.cos(a) for a in ang] + [math.sin(a) for a in ang])
    return torch.tensor(rows, dtype=torch.float64)


def test_tokenizer_rope_table_matches_formula():
    table = tokenizer_rope_table(64, 16, 16)
    assert table.shape == (256, 128)
    torch.testing.assert_close(table.double(), reference_rope_table(64, 16, 16), atol=1e-6, rtol=0)


def test_tokenizer_rope_rotation_pairs_adjacent_channels():
    d = 8
    table = reference_rope_table(d, 3, 3)
    x = torch.randn(1, 1, 9, d, dtype=torch.float64)
    out = apply_rope(x, table)
    cos, sin = table[:, :d], table[:, d:]
    expected = torch.empty_like(x)
    for i in range(d // 2):
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        expected[..., 2 * i] = a * cos[:, 2 * i] - b * sin[:, 2 * i]
        expected[..., 2 * i + 1] = b * cos[:, 2 * i + 1] + a * sin[:, 2 * i + 1]
    torch.testing.assert_close(out, expected)
    # Block-repeated frequencies against pair rotation: not norm-preserving, as released.
    assert not torch.allclose(out.norm(dim=-1), x.norm(dim=-1))


def test_pixel_shuffle_order_is_p1_p2_c():
    p, h, w = 2, 2, 3
    x = torch.arange(p * p * 3 * h * w, dtype=torch.float32).view(1, p * p * 3, h, w)
    img = unpatchify(x, p)
    for p1 in range(p):
        for p2 in range(p):
            for c in range(3):
                ch = (p1 * p + p2) * 3 + c
                assert torch.equal(img[0, c, p1::p, p2::p], x[0, ch])


def test_posterior_clamps_and_kl_over_given_tokens():
    mean, logvar = torch.randn(2, 5, 4), torch.full((2, 5, 4), 50.0)
    post = DiagonalGaussian(torch.cat([mean, logvar], -1))
    assert post.logvar.max() == 20.0
    m, lv = torch.randn(3, 7, 4), torch.randn(3, 7, 4)
    kl = DiagonalGaussian(torch.cat([m, lv], -1)).kl()
    assert torch.allclose(kl, (0.5 * (m ** 2 + lv.exp() - 1 - lv)).sum((1, 2)).mean())


def test_kl_counts_only_kept_tokens():
    torch.manual_seed(0)
    model = build_model("RecTok-TT", latent_channels=8, image_size=16, patch_size=4, semantic_decoder="none")
    x = torch.randn(2, 3, 16, 16)
    ids = torch.tensor([[0, 3, 5], [1, 2, 15]])
    masked = model.encode(x, ids)
    full = model.encode(x)
    assert masked.mean.shape == (2, 3, 8)
    # Token dropping happens before the blocks, so kept tokens attend only to kept tokens: compare
    # against the closed form on the masked posterior itself, and check it differs from the full one.
    m, lv = masked.mean, masked.logvar
    assert torch.allclose(masked.kl(), (0.5 * (m ** 2 + lv.exp() - 1 - lv)).sum((1, 2)).mean())
    assert masked.kl() < full.kl()


def test_decoder_fills_mask_tokens_and_restores_order():
    torch.manual_seed(0)
    model = build_model("RecTok-TT", latent_channels=8, image_size=16, patch_size=4, semantic_decoder="transformer",
                        teacher_dim=32)
    z = torch.randn(2, 16, 8)
    ids_all = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(model.decode(z, ids_all), model.decode(z), atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[0, 5, 9], [2, 3, 4]])
    img = model.decode(z[:, :3], ids)
    assert img.shape == (2, 3, 16, 16)
    sem = model.semantic_decoder(z[:, :3], ids)
    assert sem.shape == (2, 16, 32)


def test_mlp_semantic_decoder_variant():
    model = build_model("RecTok-TT", latent_channels=8, image_size=16, patch_size=4, semantic_decoder="mlp",
                        teacher_dim=32)
    assert model.semantic_decoder(torch.randn(2, 16, 8)).shape == (2, 16, 32)


def test_init_matches_release():
    torch.manual_seed(0)
    model = build_model("RecTok-BB", latent_channels=16)
    w = model.encoder.transformer[0].attn.qkv.weight
    # trunc_normal_(std=0.02) with the usual absolute bounds [-2, 2]: effectively N(0, 0.02).
    assert abs(w.std().item() - 0.02) < 0.0005
    assert model.encoder.transformer[0].attn.qkv.bias.abs().max() == 0
    assert abs(model.decoder.mask_token.std().item() - 768 ** -0.5) < 0.005
    assert model.semantic_decoder.mask_embedding.abs().max() == 0


def test_unknown_model_name_is_clear():
    with pytest.raises(KeyError, match="RecTok-BB"):
        build_model("RecTok-XX")
