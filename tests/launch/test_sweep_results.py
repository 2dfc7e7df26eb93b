"""`rectok sweep SWEEP --status / --table / --plot` read what the submission resolved (SWEEP_DIR/sweep.json).

The sweep folder is built without training: the run directories are written by the functions the
trainer, the submission and the evaluation commands write them with (config.yaml, submissions.jsonl,
metrics.jsonl, done.json, RUN/eval/eval_*.json), and sweep.json by the submission's writer. The sweep
had overrides typed at submission, one of them a weight file relative to the submission's working
directory; status, table and plot then run from another working directory, without that file and
without the overrides.
"""
import csv
import json
import os

import pytest
from conftest import assert_png

from trainer.cli import main

pytestmark = pytest.mark.quick

TYPED = ["optim.base_lr=0.002", "teacher.weights=teacher.pth"]  # typed at submission, not in the sweep file
DEAD_PID = str(2**22 + 1)  # above the kernel's largest pid_max: a local job (its controller's pid) that ended
# latent channels -> what the run directory holds
RUNS = {
    4: {"finished": True, "tokenizer": {"rfid_ema": 12.5, "psnr_ema": 24.0}, "probe": 0.6},
    8: {"finished": True, "tokenizer": {"rfid_ema": 8.25, "psnr_ema": 26.5}, "probe": 0.75},
    16: {"finished": False},  # submitted, its job ended before the end: stopped, tracked evaluation only
    32: None,  # never submitted
}


def write_sweep(path, output_dir, **extra) -> str:
    spec = {"base": "rectok/tiny_stage1", "name_keys": ["model.latent_channels"],
            "overrides": [f"run.output_dir={output_dir}", "logging.tensorboard=false"],
            "variants": [{"model.latent_channels": c} for c in RUNS], **extra}
    path.write_text(json.dumps(spec))  # JSON is YAML
    return str(path)


def tracked(step: int, psnr: float) -> list[dict]:
    return [{"step": step // 2, "epoch": 0.5, "total": 1.0, "lr": 1e-3},
            {"step": step, "epoch": 1.0, "eval/psnr_ema": psnr, "eval/psnr_raw": psnr - 1, "eval/grid": "none.png"}]


@pytest.fixture
def submitted_sweep(tmp_path, monkeypatch):
    """A sweep submitted from tmp/login with TYPED overrides, its runs in the states of RUNS."""
    from data.files import write_text
    from slurm.submit import record_submission, write_config
    from slurm.sweep import load_sweep, resolution, write_resolution
    from trainer.config.recipes import dump_config
    from trainer.engine.preemption import write_done
    from trainer.engine.tracking import Tracker
    from trainer.workflows.evaluate import write_result

    login = tmp_path / "login"
    login.mkdir()
    monkeypatch.chdir(login)
    write_text("teacher.pth", "not a real teacher: only its presence is checked at submission")
    sweep = write_sweep(tmp_path / "s.yaml", tmp_path / "runs")
    argv = ["sweep", sweep, *TYPED]
    spec, variants = load_sweep(sweep, TYPED)  # with the file checks of a submission
    rows = []
    for v, (channels, run) in zip(variants, RUNS.items()):
        rows.append({"action": "submit" if run is not None else "skip", "job_id": None})
        if run is None:
            continue
        write_config(v.cfg)
        rows[-1]["job_id"] = DEAD_PID
        record_submission(v.cfg.run_dir, 1, argv, "local", DEAD_PID, sweep=spec.name, variant=v.name,
                          config_hash=v.config_hash)
        tracker = Tracker(v.cfg, v.cfg.run_dir, main=True)
        records = tracked(40 if run["finished"] else 30, 20.0 + channels / 8)
        for record in records:
            tracker.log(record)
        tracker.close()
        if run["finished"]:
            write_done(v.cfg.run_dir, dump_config(v.cfg), 40, os.path.join(v.cfg.run_dir, "checkpoints", "step_40"),
                       records[-1])
            out = os.path.join(v.cfg.run_dir, "eval")
            write_result({"num_images": 16, "rfid_raw": 99.0, "psnr_raw": 1.0, **run["tokenizer"], "seconds": 1.0},
                         out, "eval_tokenizer.json")
            write_result({"t": 0.5, "chance": 0.1, "top1_clean": run["probe"], "top1_t0.5": run["probe"] - 0.2},
                         out, "eval_probe.json")
    path = write_resolution(resolution(spec, variants, sweep), argv, TYPED, "local", rows)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return sweep, path, variants


def test_status_table_and_plot_read_the_submission_from_anywhere(submitted_sweep, tmp_path, capsys):
    from slurm.sweep import load_sweep
    sweep, stored, variants = submitted_sweep
    sweep_dir = tmp_path / "runs" / "s"
    assert stored == str(sweep_dir / "sweep.json")
    res = json.loads((sweep_dir / "sweep.json").read_text())
    assert res["sweep"] == "s" and res["keys"] == ["model.latent_channels"] and res["overrides"] == TYPED
    assert res["command"] == f"rectok sweep {sweep} {' '.join(TYPED)}" and res["submitted"]
    assert [(v["name"], v["values"]) for v in res["variants"]] == [
        (f"latent_channels={c}", {"model.latent_channels": c}) for c in RUNS]
    assert [v["run_dir"] for v in res["variants"]] == [str(sweep_dir / f"latent_channels={c}") for c in RUNS]
    assert [v["config_hash"] for v in res["variants"]] == [v.config_hash for v in variants]
    assert all("teacher.weights=teacher.pth" in v["overrides"] for v in res["variants"])
    # Without the typed overrides the sweep file resolves to other configs: the stored hashes are the truth.
    _, now = load_sweep(sweep, check=False)
    assert not {v.config_hash for v in now} & {v["config_hash"] for v in res["variants"]}

    for where in (sweep, str(sweep_dir)):  # the sweep file, or its folder
        assert main(["sweep", where, "--status"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("sweep s: 4 variants, as resolved at submission") and "note" not in lines[0]
        head, *rows = lines[1:]
        assert head.split()[:7] == ["variant", "state", "step", "rfid", "psnr", "probe_clean", "probe_xt"]
        assert len(rows) == 4
        assert rows[0].split()[:7] == ["latent_channels=4", "finished", "40", "12.5", "24", "0.6", "0.4"]
        assert rows[0].endswith(str(sweep_dir / "latent_channels=4"))
        assert rows[1].split()[:7] == ["latent_channels=8", "finished", "40", "8.25", "26.5", "0.75", "0.55"]
        assert rows[2].split()[:7] == ["latent_channels=16", "stopped", "30", "-", "-", "-", "-"]
        assert rows[3].split()[:6] == ["latent_channels=32", "not", "submitted", "0", "-", "-"]

    assert main(["sweep", sweep, "--table"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["csv"] == str(sweep_dir / "results.csv") and out["markdown"] == str(sweep_dir / "results.md")
    assert out["columns"] == {"rfid": "rfid_ema", "psnr": "psnr_ema", "probe_clean": "top1_clean",
                              "probe_xt": "top1_t0.5"}
    with open(out["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["model.latent_channels"], r["variant"], r["state"]) for r in table] == [
        ("4", "latent_channels=4", "finished"), ("8", "latent_channels=8", "finished"),
        ("16", "latent_channels=16", "stopped"), ("32", "latent_channels=32", "not submitted")]
    assert [(float(r["rfid"]), float(r["psnr"]), float(r["probe_clean"])) for r in table[:2]] == [
        (12.5, 24.0, 0.6), (8.25, 26.5, 0.75)]
    assert table[2]["rfid"] == table[2]["psnr"] == table[3]["probe_xt"] == ""
    assert table[0]["run_dir"] == str(sweep_dir / "latent_channels=4") and table[0]["step"] == "40"
    md = (sweep_dir / "results.md").read_text().splitlines()
    assert "| model.latent_channels | rFID | PSNR (dB) | probe top-1, clean latents | probe top-1, x_t | state |" in md
    assert "| 4 | 12.5 | 24 | 0.6 | 0.4 | finished |" in md and "| 32 | - | - | - | - | not submitted |" in md

    assert main(["sweep", str(sweep_dir), "--plot"]) == 0
    plot = json.loads(capsys.readouterr().out)
    assert plot["x"] == "model.latent_channels" and plot["values"] == [4, 8, 16, 32]
    assert plot["final"]["latent_channels=8"]["rfid"] == 8.25
    assert plot["results"]["latent_channels=16"]["eval/psnr_ema"] == 22.0  # tracked, for the curves
    assert plot["metrics_against"] == str(sweep_dir / "pictures" / "sweep_metrics.png")
    assert_png(plot["metrics_against"])
    assert_png(plot["metrics_curves"])
    assert os.listdir(".") == []  # nothing written where the commands ran


def test_status_of_a_sweep_never_submitted_says_so(tmp_path, monkeypatch, capsys):
    """No sweep.json: the variants as the file resolves now, without file checks (the weight file it
    names is nowhere), and a note that the sweep was never submitted; --table has nothing to write."""
    monkeypatch.chdir(tmp_path)
    sweep = write_sweep(tmp_path / "fresh.yaml", tmp_path / "runs", overrides=[
        f"run.output_dir={tmp_path / 'runs'}", "teacher.weights=nowhere.pth"])
    assert main(["sweep", sweep, "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("note: sweep fresh was never submitted to " + str(tmp_path / "runs" / "fresh")), lines
    assert lines[1] == "sweep fresh: 4 variants"
    assert [line.split()[1:3] for line in lines[3:]] == [["not", "submitted"]] * 4
    assert main(["sweep", sweep, "--table"]) == 2
    assert "sweep fresh: no variant has a result yet" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path), "--status"]) == 2  # a folder that is no sweep's
    assert "a folder without sweep.json" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["fresh.yaml"]
