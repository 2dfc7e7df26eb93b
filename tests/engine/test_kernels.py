"""Run-time kernel choice: attention numerics against float64, and the selection rules."""
import pytest
import torch

from models import build_model
from models.blocks import attention, set_attention_backend
from trainer.config.tree import ConfigError
from trainer.engine import kernels

pytestmark = pytest.mark.quick


def reference_attention(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v


@pytest.mark.parametrize("requested", ["auto", "math"])
@pytest.mark.parametrize("head_dim", [64, 72, 128])
def test_chosen_attention_matches_float64_reference(head_dim, requested):
    device = torch.device("cpu")
    name, _ = kernels.choose_attention(requested, device, {head_dim})
    set_attention_backend(name)
    try:
        g = torch.Generator().manual_seed(head_dim)
        q, k, v = (torch.randn(2, 3, 50, head_dim, generator=g) for _ in range(3))
        out = attention(q, k, v)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=2e-6, rtol=1e-5)
    finally:
        set_attention_backend("sdpa")


def test_selection_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.choose_attention("auto", cpu, {64})[0] == "sdpa"
    assert kernels.choose_attention("sdpa", cuda, {64}) == ("sdpa", "asked for")
    with pytest.raises(ConfigError, match="parallel.attention: flash .* cannot run"):
        kernels.choose_attention("flash", cpu, {64})
    # flash-attn and a GPU cannot exist on this machine: their availability is simulated here.
    monkeypatch.setattr(kernels, "flash_attn_usable", lambda: (True, "flash-attn with CUDA kernels"))
    assert kernels.choose_attention("auto", cuda, {64, 72, 128})[0] == "flash"
    name, why = kernels.choose_attention("auto", cuda, {64, 320})
    assert name == "sdpa" and "320" in why
    assert kernels.choose_adamw(cpu)[0] == "foreach"
    assert kernels.choose_adamw(cuda, "for-loop") == ("for-loop", "asked for")
    # auto never picks apex (it would bring back a per-step loss read), installed or not.
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object())
    assert kernels.choose_adamw(cuda)[0] == "fused"
    assert kernels.choose_adamw(cuda, "apex") == ("apex", "asked for")
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="apex was asked for but is not installed"):
        kernels.choose_adamw(cuda, "apex")


def test_head_dims_of_the_models():
    with torch.device("meta"):
        dit = build_model("DiTDH-XL", latent_channels=128)
        tok = build_model("RecTok-BB", latent_channels=128)
    assert kernels.attention_head_dims([dit]) == {72, 128}
    assert kernels.attention_head_dims([tok]) == {64, 48}  # ViT-B encoder/decoder, tiny semantic decoder


def test_adamw_implementations_take_the_same_step():
    """The benchmarks' baseline (per-tensor for-loop) and the fast kernels are the same optimiser."""
    from trainer.engine.optim import build_adamw
    results = []
    for impl in ("for-loop", "foreach", "fused"):  # torch's fused AdamW also runs on CPUs
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
        opt = build_adamw(model, 1e-2, (0.9, 0.95), 1e-8, 0.1, impl)
        for _ in range(3):
            model(torch.ones(2, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])
