"""Weight-decay groups, the lr schedule and the EMA (docs/reference.md §1.10)."""
import math

import pytest
import torch

from models import build_model
from trainer.engine.ema import EMA
from trainer.engine.optim import constant_linear, lr_schedule, param_groups, warmup_cosine

pytestmark = pytest.mark.quick


def test_weight_decay_groups():
    model = build_model("RecTok-TT", latent_channels=8, image_size=16, patch_size=4, teacher_dim=32)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    for n in ("encoder.positional_embedding", "decoder.positional_embedding", "decoder.mask_token",
              "semantic_decoder.mask_embedding", "semantic_decoder.positional_embedding",
              "encoder.ln_pre.weight", "encoder.transformer.0.norm1.weight", "encoder.transformer.0.attn.qkv.bias",
              "encoder.patch_embed.bias", "decoder.conv_out.bias"):
        assert n in nd, n
    for n in ("encoder.transformer.0.attn.qkv.weight", "encoder.patch_embed.weight", "encoder.latent_head.weight",
              "decoder.ffn.weight", "semantic_decoder.out.weight"):
        assert n in d, n
    assert len(nd) + len(d) == len(names)


def test_embedding_tables_and_frozen_params_are_excluded():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[2].requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert {tuple(p.shape) for p in no_decay["params"]} == {(10, 4), (4,)}


def test_warmup_cosine_schedule():
    peak, total, warm = 4e-4, 1000, 250
    assert warmup_cosine(0, total, warm, peak) == 0.0
    assert warmup_cosine(125, total, warm, peak) == pytest.approx(peak / 2)
    assert warmup_cosine(250, total, warm, peak) == pytest.approx(peak)
    assert warmup_cosine(625, total, warm, peak) == pytest.approx(peak / 2)
    assert warmup_cosine(1000, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    mid = warmup_cosine(400, total, warm, peak, min_lr=1e-5)
    assert mid == pytest.approx(1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * 150 / 750)))
    lrs = [warmup_cosine(s, total, warm, peak) for s in range(total)]
    assert all(a <= b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))


def test_constant_then_linear_schedule_of_the_dit_recipe():
    # docs/reference.md §2.3: 2e-4 constant to epoch 40, then linear to 2e-5 at epoch 800; a 600-epoch run stops before.
    lr = lr_schedule("constant_linear", 100, 600 * 100, 0, 2e-4, 2e-5, 40, 800)
    assert lr(0) == lr(4000) == 2e-4
    assert lr(4200) == pytest.approx(2e-4 - 1.8e-4 * 2 / 760)
    assert lr(42_000) == pytest.approx(1.1e-4)
    assert lr(80_000) == pytest.approx(2e-5) and lr(90_000) == pytest.approx(2e-5)
    assert lr(60_000) == pytest.approx(2e-4 - 1.8e-4 * 560 / 760)
    assert constant_linear(5, 10, 20, 30, 1.0, 0.0) == pytest.approx(0.5)  # optional warm-up


def test_ema_update_rule():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    for _ in range(200):
        ema.update(model)
    torch.testing.assert_close(ema.model.weight, model.weight.detach(), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in ema.model.parameters())
