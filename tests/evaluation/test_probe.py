"""Linear probes: the classifier itself on features with a known answer, x_t along the flow, and
`rectok eval probe` on the tiny tokenizer (its accuracy on the default dataset: test_report.py)."""
import json

import pytest
import torch

from trainer.cli import main
from trainer.evaluation.probe import fit_linear_probe, noised, pooled


def separable(n, d=16, classes=5, seed=0):
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), y


@pytest.mark.quick
def test_probe_learns_separable_features_and_noise_destroys_them():
    (xt, yt), (xv, yv) = separable(500), separable(200, seed=1)
    assert fit_linear_probe(xt, yt, xv, yv, 5, epochs=30) > 0.95
    z_train, z_val = xt[:, :, None, None], xv[:, :, None, None]  # as [N, C, 1, 1] latents
    assert torch.equal(noised(z_train, 1.0), z_train)
    at_noise = fit_linear_probe(pooled(noised(z_train, 0.0, 1), "mean"), yt, pooled(noised(z_val, 0.0, 2), "mean"), yv,
                                5, epochs=30)
    assert at_noise < 0.4  # t = 0 is pure noise: chance is 0.2
    with pytest.raises(ValueError, match="pool"):
        pooled(z_train, "max")


def test_probe_command_on_the_tiny_tokenizer(tmp_path, tokenizer_run, capsys):
    assert main(["eval", "probe", tokenizer_run, "--epochs", "5", "--pool", "flatten", "--num-train", "80",
                 "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "eval_probe.json").read_text())
    assert out["train_images"] == 80 and out["val_images"] == 40 and out["classes"] == 10 and out["t"] == 0.5
    assert 0 <= out["top1_clean"] <= 1 and 0 <= out["top1_t0.5"] <= 1 and out["chance"] == 0.1
    assert main(["eval", "probe", tokenizer_run, "--t", "2"]) == 2
    assert "--t must lie in [0, 1]" in capsys.readouterr().err
