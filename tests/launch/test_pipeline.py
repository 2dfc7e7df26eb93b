"""Pipelines (slurm/pipeline.py): a sweep whose variants each run stages in order, on the real Slurm cluster
(tests/conftest.py's `slurm`) as one array job per stage, variant i of a stage after variant i of the stage
before (aftercorr); and the checks a pipeline file gets before anything is submitted."""
import json
import os
import subprocess

import pytest
from conftest import assert_png, wait_until

from slurm.pipeline import StageConfig, plan, read_stages
from slurm.sweep import IN_QUEUE, load_pipeline
from trainer.cli import main
from trainer.config.tree import ConfigError

STAGES = [
    {"name": "stage1", "recipe": "rectok/tiny_stage1", "overrides": ["run.max_steps=2", "eval.every_epochs=0"]},
    {"name": "cache", "kind": "cache-latents", "recipe": "dit/tiny_dit", "overrides": ["dit.tokenizer={stage1}"],
     "args": {"batch_size": 32}},
    {"name": "probe", "kind": "eval-probe", "run": "stage1", "args": {"epochs": 5, "num_train": 40, "num_val": 20}},
]


def write_sweep(path, overrides, variants, stages=STAGES) -> None:
    path.write_text(json.dumps({"base": "rectok/tiny_stage1", "overrides": overrides, "variants": variants,
                                "name_keys": ["model.latent_channels"], "stages": stages}))


@pytest.mark.quick
def test_a_pipeline_file_is_checked_before_anything_is_submitted(tmp_path, micro):
    with pytest.raises(ConfigError, match=r"stages\[1\].run: eval-probe evaluates an earlier stage; one of stage1"):
        read_stages([STAGES[0], {"name": "probe", "kind": "eval-probe", "run": "later"}], "f.yaml")
    with pytest.raises(ConfigError, match="stage1 names two stages"):
        read_stages([STAGES[0], STAGES[0]], "f.yaml")
    with pytest.raises(ConfigError, match=r"key sweep.stages\[0\].recpie; did you mean sweep.stages\[0\].recipe"):
        read_stages([{"name": "s", "recpie": "x"}], "f.yaml")
    sweep = tmp_path / "p.yaml"
    write_sweep(sweep, micro, [{"model.latent_channels": 4}],
                [STAGES[0], {**STAGES[1], "overrides": ["dit.tokenizer={stage2}"]}])
    with pytest.raises(ConfigError, match=r"stage cache: \{stage2\} names no earlier stage \(stage1\)"):
        load_pipeline(str(sweep))
    write_sweep(sweep, micro, [{"model.latent_channels": 4}], [STAGES[0], {**STAGES[2], "args": {"epoch": 5}}])
    with pytest.raises(ConfigError, match="args of a eval-probe stage: .*epoch.*its options: .*epochs"):
        load_pipeline(str(sweep))
    write_sweep(sweep, micro, [{"model.latent_channels": 4}], [*STAGES, {**STAGES[2], "name": "p2", "run": "probe"}])
    with pytest.raises(ConfigError, match=r"stages\[3\].run: eval-probe evaluates a training's run; stage probe is "
                                          "a eval-probe stage"):
        load_pipeline(str(sweep))
    # A training some variants skip stands for the cache stage in the others: not a training's run there.
    stand_in = {"name": "again", "recipe": "rectok/tiny_stage1", "only": ["latent_channels=8"], "otherwise": "cache"}
    with pytest.raises(ConfigError, match=r"stages\[3\].run: eval-probe evaluates a training's run; stage again is "
                                          "skipped by some variants, cache there"):
        read_stages([*STAGES[:2], stand_in, {**STAGES[2], "run": "again"}], "f.yaml")
    only = {"name": "again", "recipe": "rectok/tiny_stage1", "only": ["nope"], "otherwise": "stage1"}
    write_sweep(sweep, micro, [{"model.latent_channels": 4}], [STAGES[0], only])
    with pytest.raises(ConfigError, match=r"stage again: only: nope is no variant's folder name \(latent_channels=4\)"):
        load_pipeline(str(sweep))
    with pytest.raises(ConfigError, match=r"stages\[1\].otherwise: a stage only some variants run names the earlier"):
        read_stages([STAGES[0], {**only, "otherwise": ""}], "f.yaml")
    # A stage only one variant runs: the other's {again} is its stage1, and its task does nothing.
    write_sweep(sweep, micro, [{"model.latent_channels": 4}, {"model.latent_channels": 8}],
                [STAGES[0], {**only, "only": ["latent_channels=8"]}, {**STAGES[2], "run": "again"}])
    _, _, grid = load_pipeline(str(sweep))
    assert [r.kind for r in grid[0]] == ["train", "skip", "eval-probe"] and grid[0][1].run_dir == grid[0][0].run_dir
    assert grid[0][2].job.kwargs["checkpoint"] == grid[0][0].run_dir and grid[0][1].job() == {
        "skipped": "not this variant's stage"}
    assert [r.kind for r in grid[1]] == ["train", "train", "eval-probe"]
    assert grid[1][2].job.kwargs["checkpoint"] == grid[1][1].run_dir != grid[1][0].run_dir
    write_sweep(sweep, micro, [{"model.latent_channels": 4}, {"model.latent_channels": 8}])
    spec, _, grid = load_pipeline(str(sweep))
    assert [[r.stage for r in runs] for runs in grid] == [["stage1", "cache", "probe"]] * 2
    cache = grid[1][1]  # {stage1} is variant latent_channels=8's own stage 1
    assert f"tokenizer: {grid[1][0].run_dir}" in cache.job.kwargs["cfg_yaml"]
    assert cache.run_dir == str(tmp_path / "p" / "latent_channels=8" / "cache")
    assert grid[1][2].job.kwargs["checkpoint"] == grid[1][0].run_dir and grid[1][2].cfg is grid[1][0].cfg
    # What is submitted, from where: a variant with a stage in the queue is left alone; the others from the
    # first stage any of them has not finished (one array index = one variant in every stage).
    assert plan(grid, [["finished"] * 3, ["finished"] * 3], IN_QUEUE) == ([], 3)
    assert plan(grid, [["finished", "finished", "stopped"], ["finished", "running", "not submitted"]],
                IN_QUEUE) == ([0], 2)
    assert plan(grid, [["finished", "failed", "not submitted"], ["not submitted"] * 3], IN_QUEUE) == ([0, 1], 0)
    assert StageConfig().kind == "train"


def squeue(*args: str) -> str:
    return subprocess.run(["squeue", "-h", "-t", "all", *args], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.slurm
def test_pipeline_stages_run_as_dependent_arrays_a_failed_variant_stops_only_itself(slurm, tmp_path, job_overrides,
                                                                                    capsys, monkeypatch):
    """Two variants, three stages (train -> latent cache -> linear probe): the queue shows each stage's array
    after the one before, task by task; variant 8 fails in stage 1 (its tasks ask for a GPU the nodes do not
    have), its later stages are cancelled and variant 4 runs to the end; fixed and resubmitted, only variant
    8 runs again; finished, resubmitting submits nothing; status, table and plot then work from another
    working directory, from the sweep folder alone."""
    sweep = tmp_path / "pipe.yaml"
    broken = [{"model.latent_channels": 4}, {"model.latent_channels": 8, "run.device": "cuda"}]
    write_sweep(sweep, job_overrides, broken)
    assert main(["sweep", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "submitted 6 of 6 stages of variants as jobs" in out
    arrays = out.split("as jobs ")[1].splitlines()[0].split(", ")
    assert len(arrays) == 3
    deps = {line.split("|")[0]: line.split("|")[1] for line in squeue("-o", "%A|%E").splitlines()}
    assert deps[arrays[1]].startswith(f"aftercorr:{arrays[0]}_*") and deps[arrays[2]].startswith(
        f"aftercorr:{arrays[1]}_*"), deps
    folder = tmp_path / "pipe"
    v4, v8 = folder / "latent_channels=4", folder / "latent_channels=8"
    wait_until(lambda: (v4 / "probe" / "done.json").exists(), 180, "variant 4 runs all three stages")
    wait_until(lambda: squeue("-j", f"{arrays[1]}_1", "-o", "%T").strip() in ("CANCELLED", ""), 60,
               "variant 8's cache task is cancelled (its stage 1 failed)")
    assert squeue("-j", f"{arrays[0]}_1", "-o", "%T").strip() == "FAILED"
    assert not (v8 / "cache" / "done.json").exists() and not (v8 / "probe" / "done.json").exists()
    probe = json.loads((v4 / "probe" / "eval" / "eval_probe.json").read_text())
    assert probe["train_images"] == 40 and 0 <= probe["top1_clean"] <= 1

    write_sweep(sweep, job_overrides, [broken[0], {"model.latent_channels": 8}])  # fixed
    assert main(["sweep", str(sweep)]) == 0
    assert "submitted 3 of 6 stages of variants" in capsys.readouterr().out
    wait_until(lambda: (v8 / "probe" / "done.json").exists(), 180, "variant 8 runs all three stages")
    assert main(["sweep", str(sweep)]) == 0
    assert "submitted 0 of 6 stages of variants" in capsys.readouterr().out

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["sweep", str(folder), "--status"]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[1].split()[:4] == ["variant", "stage1", "cache", "probe"] and "probe_clean" in status[1]
    assert [line.split()[:4] for line in status[2:]] == [[f"latent_channels={c}"] + ["finished"] * 3 for c in (4, 8)]
    assert main(["sweep", str(folder), "--table"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["rows"] == 2 and "probe_xt" in table["columns"]
    assert (folder / "results.csv").read_text().splitlines()[1].startswith("4,latent_channels=4,")
    assert main(["sweep", str(folder), "--plot"]) == 0
    assert_png(json.loads(capsys.readouterr().out)["metrics_against"])
    assert os.path.isdir(folder / "slurm" / "cache")  # submitit's files per stage


def test_a_local_pipeline_runs_stage_by_stage_and_a_failed_variant_skips_the_rest(tmp_path, micro, capsys,
                                                                                   monkeypatch):
    """Without Slurm (the local executor) the command runs the stages one after another; a variant that
    fails (here it asks for a GPU) skips its later stages, the other runs to the end; a stage that only one
    variant runs (`only`) is skipped by the other, whose `{stage}` then stands for its `otherwise`."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = tmp_path / "local.yaml"
    stages = [STAGES[0], {"name": "again", "recipe": "rectok/tiny_stage1", "only": ["fails"], "otherwise": "stage1",
                          "overrides": ["run.max_steps=1"]},
              {**STAGES[2], "run": "again"}]
    write_sweep(sweep, [*micro, "slurm.executor=local", "slurm.gpus_per_node=1"],
                [{"name": "works", "model.latent_channels": 4},
                 {"name": "fails", "model.latent_channels": 8, "run.device": "cuda"}], stages)
    assert main(["sweep", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "works / stage1: done" in out and "fails / stage1: FAILED" in out and "works / probe: done" in out
    folder = tmp_path / "local"
    probe = json.loads((folder / "works" / "probe" / "done.json").read_text())
    assert probe["result"]["checkpoint"].startswith(str(folder / "works" / "stage1"))  # {again} is its stage1
    assert not (folder / "fails" / "probe").exists() and not (folder / "works" / "again").exists()
    stored = json.loads((folder / "sweep.json").read_text())
    works, fails = stored["variants"]
    assert [s["job_id"] for s in works["stages"]][1] == "skip"
    assert [s["job_id"].split(":")[0].split(" ")[0] for s in fails["stages"]] == ["failed", "skipped", "skipped"]
    assert main(["sweep", str(folder), "--status"]) == 0
    rows = {line.split()[0]: line.split()[1:4] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["works"] == ["finished", "skip", "finished"] and rows["fails"] == ["stopped", "not", "submitted"]
