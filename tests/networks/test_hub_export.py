"""`rectok export RUN --hf DIR` and `rectok import-official --hf DIR`: a run -> a Hugging Face Hub folder
(model.safetensors, config.json, README.md) -> a run directory that works like the original."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.cli import main

FILES = ["README.md", "config.json", "model.safetensors"]


def _front_matter(card: str) -> str:
    assert card.startswith("---\n"), card[:80]
    return card.split("---\n", 2)[1]


def test_tokenizer_hub_round_trip(tmp_path, tokenizer_run, capsys):
    from models import build_model
    from trainer.engine.preemption import read_done
    from trainer.parallel.consolidate import load_state, model_weights
    from trainer.tasks.latents import FrozenTokenizer

    hub = tmp_path / "hub" / "micro_tok"
    assert main(["export", tokenizer_run, "--hf", str(hub)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(os.listdir(hub)) == FILES and result["files"] == ["model.safetensors", "config.json", "README.md"]

    # config.json: the resolved config and what the weights are.
    info = json.loads((hub / "config.json").read_text())
    state = load_state(tokenizer_run)
    assert info["format"] == "rectok-hf-1" and info["task"] == "tokenizer" and info["weights"] == "ema"
    assert info["model"] == info["config"]["model"]["name"] and info["step"] == state["step"] == 2
    assert info["source"].startswith(tokenizer_run) and info["config"]["model"]["latent_channels"] == 8
    ema = model_weights(state, use_ema=True)
    assert info["parameters"] == sum(t.numel() for t in ema.values())

    # model.safetensors: exactly the EMA state dict of the model the config builds (with its semantic decoder).
    weights = load_file(hub / "model.safetensors")
    m = info["config"]["model"]
    with torch.device("meta"):
        model = build_model(m["name"], latent_channels=8, image_size=32, patch_size=8,
                            semantic_decoder=m["semantic_decoder"], teacher_dim=32)  # dinov3-micro: 32 wide
    assert weights.keys() == model.state_dict().keys() == ema.keys()
    assert all(torch.equal(weights[k], ema[k]) for k in ema)

    # README.md: front matter, what it is, the final metrics of the run, how to load and publish it.
    card = (hub / "README.md").read_text()
    front = _front_matter(card)
    assert "library_name: rectok" in front and "- rectok" in front and "license: other" in front
    assert "PLACEHOLDER" in front and "License: not set" in card
    assert "RecTok image tokenizer" in card and "8 channels" in card and "32 px" in card
    assert "the bundled default dataset" in card and "recipe / run: `tok`" in card
    done = read_done(tokenizer_run)
    assert done and done["step"] == 2 and "done.json" in card
    evals = {k: v for k, v in done["metrics"].items() if k.startswith("eval/")}
    assert evals and all(f"| {k} | {v:.6g} |" in card for k, v in evals.items() if isinstance(v, float))
    assert "rectok import-official --hf micro_tok --out runs/hub" in card
    assert "huggingface-cli upload USER/REPO micro_tok" in card

    # Back into a run directory: a verified checkpoint that FrozenTokenizer reads, bit-identical in use.
    runs = tmp_path / "runs"
    assert main(["import-official", "--hf", str(hub), "--out", str(runs)]) == 0
    imported = json.loads(capsys.readouterr().out)[str(hub)]
    run = runs / "micro_tok"
    assert imported["run"] == str(run) and imported["task"] == "tokenizer"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step_00000000").is_dir()
    a, b = FrozenTokenizer(tokenizer_run), FrozenTokenizer(str(run))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (ma, la), (mb, lb) = a.moments(x), b.moments(x)
    assert torch.equal(ma, mb) and torch.equal(la, lb) and torch.equal(a.decode(ma), b.decode(mb))
    assert a.hash == b.hash
    assert main(["import-official", "--hf", str(hub), "--out", str(runs)]) == 2
    assert "already holds a checkpoint; --force" in capsys.readouterr().err
    assert main(["import-official", "--hf", str(hub), "--out", str(runs), "--force"]) == 0
    capsys.readouterr()

    # --raw exports the raw weights.
    assert main(["export", tokenizer_run, "--hf", str(tmp_path / "raw"), "--raw"]) == 0
    capsys.readouterr()
    raw = model_weights(state, use_ema=False)
    got = load_file(tmp_path / "raw" / "model.safetensors")
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["weights"] == "raw"
    assert all(torch.equal(got[k], raw[k]) for k in raw)


def test_damaged_hub_folders_fail_clearly(tmp_path, tokenizer_run, capsys):
    hub = tmp_path / "good"
    assert main(["export", tokenizer_run, "--hf", str(hub)]) == 0
    capsys.readouterr()

    def damaged(name: str):
        path = tmp_path / name
        shutil.copytree(hub, path)
        return path

    def refused(folder) -> str:
        assert main(["import-official", "--hf", str(folder), "--out", str(tmp_path / "runs")]) == 2
        return capsys.readouterr().err

    missing = damaged("missing")
    (missing / "model.safetensors").unlink()
    err = refused(missing)
    assert f"{missing / 'model.safetensors'} is missing" in err and "rectok export RUN --hf DIR" in err

    tag = damaged("tag")
    info = json.loads((tag / "config.json").read_text())
    (tag / "config.json").write_text(json.dumps({**info, "format": "rectok-hf-0"}))
    err = refused(tag)
    assert f"{tag / 'config.json'}: format 'rectok-hf-0', expected 'rectok-hf-1'" in err

    cut = damaged("cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert f"{cut / 'model.safetensors'}: cannot read as safetensors" in refused(cut)

    keys = damaged("keys")
    weights = load_file(keys / "model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, keys / "model.safetensors")
    err = refused(keys)
    assert f"{keys / 'model.safetensors'}: does not fit" in err and dropped in err and "extra.weight" in err
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")
    assert main(["import-official", "--hf", str(tmp_path / "nowhere")]) == 2
    assert "hub folder not found" in capsys.readouterr().err


@pytest.mark.quick
def test_export_hf_and_official_exclusive(tmp_path, capsys):
    assert main(["import-official", "--hf", str(tmp_path), "--tokenizer", "x.pth"]) == 2
    assert "--hf folders are imported on their own" in capsys.readouterr().err


def test_dit_hub_round_trip(tmp_path, tokenizer_run, dataset_dir, capsys):
    """A tiny DiT (2 steps) exported with its tokenizer, imported as a pair: it samples the same images."""
    import numpy as np

    from trainer.config.recipes import load_config
    from trainer.engine.checkpoint import saved_config
    from trainer.tasks.sampling import load_dit
    from trainer.tasks.training import train
    over = [f"run.output_dir={tmp_path}", "run.name=dit", f"dit.tokenizer={tokenizer_run}",
            f"dit.stats={tmp_path / 'stats.json'}", "model.latent_channels=8", "model.patch_size=8",
            f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16", "data.global_batch=16",
            "logging.progress=false", "eval.num_images=16", "eval.grid_images=2", "eval.classifier=none",
            "sample.steps=2", "checkpoint.every_steps=0", "run.max_steps=2", "eval.every_epochs=0",
            "dit.latents=online"]
    dit = train(load_config("dit/tiny_dit", over))["run_dir"]
    hub = tmp_path / "hub"
    assert main(["export", tokenizer_run, "--hf", str(hub / "tok")]) == 0
    assert main(["export", dit, "--hf", str(hub / "dit")]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(hub / "dit")) == sorted(FILES + ["latent_stats.json"])
    info = json.loads((hub / "dit" / "config.json").read_text())
    assert (info["task"], info["model"], info["num_classes"], info["latent_channels"]) == ("dit", "DiTDH-T", 10, 8)
    card = (hub / "dit" / "README.md").read_text()
    assert "DiT^DH generator (DiTDH-T, 10 classes)" in card and "eval/loss_ema" in card
    assert "rectok import-official --hf TOKENIZER_FOLDER --hf dit --out runs/hub" in card

    runs = tmp_path / "runs"
    assert main(["import-official", "--hf", str(hub / "dit"), "--hf", str(hub / "tok"), "--out", str(runs)]) == 0
    capsys.readouterr()
    cfg = saved_config(str(runs / "dit"))
    assert cfg.dit.tokenizer == str(runs / "tok") and cfg.dit.stats == str(runs / "dit" / "latent_stats.json")
    assert (runs / "dit" / "latent_stats.json").read_bytes() == (tmp_path / "stats.json").read_bytes()
    (a, _), (b, _) = load_dit(dit), load_dit(str(runs / "dit"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for run, out in ((dit, "s0"), (str(runs / "dit"), "s1")):
        assert main(["sample", run, "--out", str(tmp_path / out), "--num-images", "4", "sample.steps=2"]) == 0
    capsys.readouterr()
    s0, s1 = (np.load(tmp_path / o / "samples.npz")["arr_0"] for o in ("s0", "s1"))
    assert np.array_equal(s0, s1)

    # A DiT folder alone, its tokenizer not on this machine: refused with the way out.
    moved = json.loads((hub / "dit" / "config.json").read_text())
    moved["config"]["dit"]["tokenizer"] = str(tmp_path / "elsewhere")
    (hub / "dit" / "config.json").write_text(json.dumps(moved))
    assert main(["import-official", "--hf", str(hub / "dit"), "--out", str(tmp_path / "alone")]) == 2
    assert "import its folder alongside (--hf TOKENIZER_FOLDER" in capsys.readouterr().err
