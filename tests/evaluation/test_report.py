"""Pictures (`rectok report`) and the linear probe on the default dataset: every picture of a tiny
tokenizer and DiT run opens as a PNG; the latent maps compute what they claim on latents with a known
answer. (The sweep plots are exercised on a real sweep in tests/launch/test_multinode.py.)"""
import json

import pytest
import torch
from conftest import assert_png

from trainer.cli import main
from trainer.evaluation.pictures import cosine_to_token, latent_pca, metrics_against


@pytest.mark.quick
def test_latent_pca_and_cosine_maps_on_known_latents():
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    z = a.repeat(2, 4, 4, 1)
    z[:, 2:, :] = b  # bottom half of each image: an orthogonal token
    z = z.permute(0, 3, 1, 2)  # [B, C, h, w]
    cos = cosine_to_token(z, 0, 0)
    assert cos.shape == (2, 4, 4)
    assert torch.allclose(cos[:, :2], torch.ones(2, 2, 4)) and torch.allclose(cos[:, 2:], torch.zeros(2, 2, 4))
    assert torch.allclose(cosine_to_token(z)[:, 2:], torch.ones(2, 2, 4))  # the default query: the centre (2, 2)
    pca = latent_pca(z)
    assert pca.shape == (2, 4, 4, 3) and pca.min() >= 0 and pca.max() <= 1
    top, bottom = pca[:, 0, 0], pca[:, 3, 3]
    assert torch.allclose(pca[:, :2], top[:, None, None].expand(2, 2, 4, 3))  # one colour per kind of token
    assert (top - bottom).abs().max() > 0.9  # ... and the two kinds far apart on the first component


def test_probe_beats_chance_by_a_wide_margin_on_the_default_dataset(tmp_path, tokenizer_run):
    """The bundled dataset's classes differ in shape and in hue band: even the 2-step test tokenizer's
    latents (8 x 8 tokens x 8 channels) separate them linearly."""
    assert main(["eval", "probe", tokenizer_run, "--pool", "flatten", "--epochs", "30", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "eval_probe.json").read_text())
    assert out["train_images"] == 160 and out["val_images"] == 40 and out["chance"] == 0.1
    assert out["top1_clean"] >= 0.4, out  # 4x chance (0.675 measured)


def test_report_of_a_tokenizer_run(tmp_path, tokenizer_run, capsys):
    assert main(["report", tokenizer_run, "--out", str(tmp_path), "--columns", "4"]) == 0
    files = json.loads(capsys.readouterr().out)
    assert set(files) == {"reconstructions", "latent_maps", "tsne_flow", "metrics"}
    for path in files.values():
        assert_png(path)
    metrics_against([16, 32, 64, 128], {"PSNR": [20.0, None, 22.5, 23.0]}, "model.latent_channels",
                    str(tmp_path / "against.png"))
    assert_png(tmp_path / "against.png")


def test_report_of_a_dit_run_samples_by_class_and_guidance(tmp_path, dataset_dir, tokenizer_run, capsys):
    from trainer.config.recipes import load_config
    from trainer.engine.tracking import read_metrics
    from trainer.tasks.training import train
    over = [f"run.output_dir={tmp_path}", "run.name=dit", f"dit.tokenizer={tokenizer_run}",
            f"dit.cache_dir={tmp_path / 'cache'}", f"dit.stats={tmp_path / 'stats.json'}", "model.latent_channels=8",
            "model.patch_size=8", f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16",
            "data.global_batch=16", "logging.progress=false", "eval.num_images=16", "eval.grid_images=2",
            "sample.steps=2", "checkpoint.every_steps=0", "run.max_steps=2", "eval.every_epochs=0",
            "eval.at_start=true"]
    assert main(["cache-latents", "dit/tiny_dit", *over]) == 0
    run = train(load_config("dit/tiny_dit", over))["run_dir"]
    assert [r["epoch"] for r in read_metrics(run) if "eval/loss_ema" in r] == [0, pytest.approx(2 / 10)]
    capsys.readouterr()
    assert main(["report", run, "--columns", "3"]) == 0
    files = json.loads(capsys.readouterr().out)
    assert set(files) == {"samples_by_class", "metrics"}
    for path in files.values():
        assert path.startswith(f"{run}/pictures/")
        assert_png(path)
