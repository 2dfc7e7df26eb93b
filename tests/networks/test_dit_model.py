"""DiT^DH: sizes, compute, zero init, conditioning, checkpoint key names and RoPE (docs/reference.md §2.1-2.2, 6, 7)."""
import math

import numpy as np
import pytest
import torch

from models import build_model
from models.blocks import apply_rope
from models.dit import eva_rope_table

pytestmark = pytest.mark.quick

PAPER_PARAMS_M = {"S": 193.59, "B": 291.18, "L": 618.47, "XL": 835.32}  # docs/reference.md §2.1 at C = 128
PAPER_FWD_BWD_GFLOP = {"S": 286, "B": 389, "L": 736, "XL": 964}  # docs/reference.md §6


def meta_model(name, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


def tiny(**kw):
    torch.manual_seed(0)
    kw = {"latent_channels": 8, "grid": 4, "num_classes": 10} | kw
    return build_model("DiTDH-T", **kw).eval()


@pytest.mark.parametrize("size", PAPER_PARAMS_M)
def test_parameter_counts_match_paper(size):
    counts = meta_model(f"DiTDH-{size}", latent_channels=128).param_counts()
    assert abs(counts["total"] / 1e6 - PAPER_PARAMS_M[size]) < 0.005
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_xl_at_c768_is_839m():
    assert round(meta_model("DiTDH-XL", latent_channels=768).param_counts()["total"] / 1e6) == 839


def test_xl_forward_flops():
    flops = meta_model("DiTDH-XL", latent_channels=128).flops_per_sample()
    assert abs(flops["total"] / 321e9 - 1) < 0.02
    assert flops["total"] == flops["trunk"] + flops["head"] + flops["other"]


@pytest.mark.parametrize("size", PAPER_FWD_BWD_GFLOP)
def test_training_flops_match_spec(size):
    fwd = meta_model(f"DiTDH-{size}", latent_channels=128).flops_per_sample()["total"]
    assert abs(3 * fwd / (PAPER_FWD_BWD_GFLOP[size] * 1e9) - 1) < 0.01


def test_fresh_model_outputs_exactly_zero_velocity():
    m = tiny(latent_channels=16, grid=16)
    x = torch.randn(3, 16, 16, 16)
    v = m(x, torch.rand(3), torch.tensor([0, 5, m.null_class]))
    assert v.shape == x.shape
    assert torch.count_nonzero(v) == 0


def randomize_zero_layers(m):
    with torch.no_grad():
        for layer in [b.adaLN_modulation[-1] for b in m.blocks] + [
                m.final_layer.adaLN_modulation[-1], m.final_layer.linear]:
            layer.weight.normal_(std=0.1)
            layer.bias.normal_(std=0.1)
    return m


def test_output_depends_on_time_label_and_input():
    m = randomize_zero_layers(tiny())
    x, t, y = torch.randn(2, 8, 4, 4), torch.tensor([0.2, 0.7]), torch.tensor([3, 4])
    with torch.no_grad():
        v = m(x, t, y)
        assert not torch.allclose(v, m(x, t.flip(0), y), atol=1e-4)
        assert not torch.allclose(v, m(x, t, torch.full_like(y, m.null_class)), atol=1e-4)
        assert not torch.allclose(v, m(x + torch.randn_like(x), t, y), atol=1e-4)
        # Samples are independent: changing sample 1 leaves sample 0 alone.
        v2 = m(torch.cat([x[:1], torch.randn_like(x[1:])]), t, torch.tensor([3, 9]))
        torch.testing.assert_close(v2[0], v[0])
        # A scalar t broadcasts over the batch.
        torch.testing.assert_close(m(x, torch.tensor(0.2), y)[0], v[0])


def test_state_dict_uses_released_key_names():
    m = tiny()
    sd = m.state_dict()
    d = m.trunk_depth
    for key in ["pos_embed", "t_embedder.W", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
                "y_embedder.embedding_table.weight", "s_embedder.proj.weight", "s_embedder.proj.bias",
                "x_embedder.proj.weight", "s_projector.weight", "s_projector.bias",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
                "blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.weight", "blocks.0.adaLN_modulation.1.weight",
                f"blocks.{d}.adaLN_modulation.1.weight", f"blocks.{d + 1}.norm2.weight",
                "final_layer.norm_final.weight", "final_layer.linear.weight",
                "final_layer.adaLN_modulation.1.weight"]:
        assert key in sd, key
    assert f"blocks.{d + 2}.norm1.weight" not in sd
    assert not [k for k in sd if "rope" in k]
    assert sd["y_embedder.embedding_table.weight"].shape[0] == m.num_classes + 1
    assert sd["t_embedder.W"].shape == (256,)
    w, hw = m.trunk_width, m.head_width
    assert sd["pos_embed"].shape == (1, 16, w)
    assert sd[f"blocks.{d}.adaLN_modulation.1.weight"].shape == (6 * hw, hw)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2 * hw, hw)
    # Fixed tensors are saved and counted but never trained.
    assert not m.t_embedder.W.requires_grad and not m.pos_embed.requires_grad
    other = tiny()
    other.load_state_dict(sd, strict=True)
    torch.testing.assert_close(other.t_embedder.W, m.t_embedder.W)


def dit_repo_pos_embed(embed_dim, grid_size):
    """The DiT repo's get_2d_sincos_pos_embed, numpy, as written there."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_is_the_dit_sincos_table():
    m = tiny()
    ref = torch.from_numpy(dit_repo_pos_embed(m.trunk_width, 4)).float().unsqueeze(0)
    torch.testing.assert_close(m.pos_embed.data, ref, atol=0, rtol=0)


def test_eva_rope_table_hand_computed():
    # head dim 8 -> 4 channels per axis -> freqs 1/10000**(0/4) = 1 and 1/10000**(2/4) = 0.01,
    # pair-interleaved: [1, 1, 0.01, 0.01]. Rows take channels 0-3, columns channels 4-7.
    rows = []
    for r in range(3):
        for c in range(3):  # row-major tokens
            ang = [r, r, 0.01 * r, 0.01 * r, c, c, 0.01 * c, 0.01 * c]
            rows.append([math.cos(a) for a in ang] + [math.sin(a) for a in ang])
    table = eva_rope_table(8, 3)
    assert table.shape == (9, 16)
    torch.testing.assert_close(table, torch.tensor(rows), atol=1e-7, rtol=0)


def test_model_rope_tables_are_per_stream_head_dims():
    m = tiny(grid=16)
    dt, dh = m.trunk_width // m.trunk_heads, m.head_width // m.head_heads
    assert dt != dh or m.trunk_width != m.head_width  # the two streams' tables are built separately
    torch.testing.assert_close(m.enc_feat_rope, eva_rope_table(dt, 16))
    torch.testing.assert_close(m.dec_feat_rope, eva_rope_table(dh, 16))
    assert m.enc_feat_rope.shape == (256, 2 * dt) and m.dec_feat_rope.shape == (256, 2 * dh)


def test_rope_attention_scores_depend_only_on_relative_offset():
    grid, dim = 6, 16
    table = eva_rope_table(dim, grid).double()
    q, k = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    qr = apply_rope(q.expand(1, 1, grid * grid, dim), table)[0, 0]
    kr = apply_rope(k.expand(1, 1, grid * grid, dim), table)[0, 0]
    scores = qr @ kr.T  # [query token, key token]

    by_offset = {}
    for qi in range(grid * grid):
        for ki in range(grid * grid):
            offset = (ki // grid - qi // grid, ki % grid - qi % grid)
            by_offset.setdefault(offset, []).append(scores[qi, ki])
    for vals in by_offset.values():
        torch.testing.assert_close(torch.stack(vals), vals[0].expand(len(vals)), atol=1e-5, rtol=0)
    assert len(by_offset) == (2 * grid - 1) ** 2
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(grid * grid), atol=1e-5, rtol=0)
    # Rows and columns are different axes: (0, 1) and (1, 0) offsets give different scores.
    assert not torch.isclose(by_offset[(0, 1)][0], by_offset[(1, 0)][0])


def test_builders_reject_unknown_arguments():
    with pytest.raises(TypeError):
        build_model("DiTDH-T", latent_channels=8, teacher_dim=1024)


def test_cli_info_reports_dit_params_and_flops(capsys):
    import json

    from trainer.cli import main
    assert main(["info", "DiTDH-XL"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["params"]["total"] / 1e6, 2) == 835.32
    assert abs(info["forward_flops_per_image"]["total"] / 321e9 - 1) < 0.02
