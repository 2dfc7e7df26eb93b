"""`rectok profile` on every recipe (synthetic data, CPU), its sweep, trace and scaling table; the
baseline-vs-fast benchmark on the tiny recipes."""
import glob
import json
import os
import sys

import pytest

from trainer.cli import main
from trainer.config.catalog import CONFIG_DIR, REPO_ROOT

RECIPES = sorted(os.path.relpath(p, CONFIG_DIR)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "*", "*.yaml"))
                 if not p.startswith(os.path.join(CONFIG_DIR, "sweeps")))
# Every recipe's own losses, optimiser, schedule and strategy, at micro width: the full sizes take
# minutes per step on a CPU (benchmarks/RESULTS.md has full-size CPU profiles).
SHRINK = {"rectok": ["model.name=RecTok-TT", "model.image_size=32", "model.patch_size=8", "model.latent_channels=8",
                     "teacher.name=dinov3-micro", "loss.convnext_size=32"],
          "dit": ["model.name=DiTDH-T", "model.image_size=32", "model.patch_size=8", "model.latent_channels=8"]}
COMMON = ["run.device=cpu", "data.global_batch=2", "data.num_workers=0"]


def test_recipes_found():
    assert {"rectok/stage1_d128", "rectok/stage2_decoder_ft", "dit/ditdh_xl", "dit/tiny_dit"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_profile_runs_every_recipe_on_cpu(recipe, tmp_path):
    from trainer.workflows.profile_steps import run_profile
    rows = run_profile(recipe, SHRINK[recipe.split("/")[0]] + COMMON, warmup=1, steps=1,
                       out_json=str(tmp_path / "rows.json"))
    (row,) = rows
    assert row["img_per_s"] > 0 and row["time/fwd_bwd_ms"] > 0 and row["per_device_batch"] == 2
    assert row["model_gflop_per_img"] > 0 and row["executed_gflop_per_img"] >= 0.5 * row["model_gflop_per_img"]
    assert json.load(open(tmp_path / "rows.json"))[0]["setting"] == row["setting"]


def test_profile_sweep_trace_and_scaling(tmp_path, capsys):
    over = SHRINK["dit"] + ["run.device=cpu", "data.num_workers=0", "logging.peak_tflops=1"]
    assert main(["profile", "dit/tiny_dit", *over, "--warmup", "1", "--steps", "2", "--sweep", "batch=2,4",
                 "--scaling", "--gpus", "8,32", "--epochs", "80", "--trace", str(tmp_path / "trace")]) == 0
    out = capsys.readouterr().out
    assert "data.global_batch=2" in out and "data.global_batch=4" in out and "MFU" in out
    assert "scaling estimate" in out and "configured: 350 GB/s" in out and "80 epochs (h)" in out
    table = [line.split() for line in out.splitlines() if line.strip().startswith(("8 ", "32 "))]
    assert [int(r[0]) for r in table] == [8, 32]
    traces = sorted(os.listdir(tmp_path / "trace"))
    assert any(t.startswith("trace_data.global_batch_2") and t.endswith(".json") for t in traces)
    json.load(open(tmp_path / "trace" / [t for t in traces if t.endswith(".json")][0]))  # a whole Chrome trace
    assert any(t.startswith("ops_") for t in traces)


def test_tokenizer_trace_splits_the_forward_by_network(tmp_path):
    """The trace's table ends with the forward time of the generator, teacher, LPIPS, ConvNeXt and
    discriminator (benchmarks/gpu_session.sh prints it for the GPU)."""
    over = SHRINK["rectok"] + COMMON + ["loss.disc_start_epoch=0"]
    assert main(["profile", "rectok/tiny_stage1", *over, "--warmup", "0", "--steps", "1",
                 "--trace", str(tmp_path), "--trace-steps", "1"]) == 0
    (ops,) = glob.glob(str(tmp_path / "ops_*.txt"))
    split = open(ops).read().split("forward time per network over 1 steps")[1]
    times = {line.split()[0]: float(line.split()[1]) for line in split.splitlines()[1:] if line.strip()}
    assert set(times) == {f"net/{n}" for n in ("generator", "teacher", "lpips", "convnext", "discriminator")}
    assert all(ms > 0 for ms in times.values()), times


def test_dit_analytic_flops_match_the_counted_flops_of_a_real_step():
    """The model FLOPs behind MFU (3x the analytic forward) against torch's FlopCounterMode over one step."""
    from trainer.workflows.profile_steps import run_profile
    (row,) = run_profile("dit/tiny_dit", SHRINK["dit"] + COMMON, warmup=0, steps=1)
    assert row["executed_gflop_per_img"] == pytest.approx(row["model_gflop_per_img"], rel=0.1)


def test_baseline_vs_fast_benchmark_reports_its_ratio(capsys):
    sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
    import train_step
    # Compilation is left out here (a cold CPU compile takes a minute); the benchmark's default compiles.
    assert train_step.main(["--tiny", "--models", "T", "--batch", "4", "--warmup", "2", "--steps", "1",
                            "--fast", "parallel.precision=bf16", "parallel.adamw=foreach"]) == 0
    out = capsys.readouterr().out
    assert "ratio" in out and "baseline" in out and "warm-up losses within" in out
