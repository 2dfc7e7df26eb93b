"""Metrics go to metrics.jsonl, TensorBoard and (offline) wandb: read back with their own readers."""
import glob
import logging
import os

from trainer.config.recipes import load_config
from trainer.engine.tracking import ProgressLines, read_metrics
from trainer.tasks.training import train


def test_tensorboard_and_offline_wandb_receive_the_metrics(micro, monkeypatch, capfd, caplog):
    """Also: off a terminal (pytest's captured stderr, as a Slurm log) no progress bar is drawn, and
    progress lines go to the log instead."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_SILENT", "true")
    caplog.set_level(logging.INFO, logger="rectok")
    cfg = load_config("rectok/tiny_stage1", [*micro, "run.max_steps=3", "logging.wandb=true",
                                             "logging.wandb_mode=offline", "data.loader=pil", "logging.progress=true",
                                             "logging.progress_every_s=1e-6"])
    result = train(cfg)
    out, err = capfd.readouterr()
    assert "\r" not in out + err and "it/s" not in out + err  # no bar, no redraws
    assert "progress: step 3/3 (100.0%)" in caplog.text and "img/s" in caplog.text
    records = read_metrics(result["run_dir"])
    train_steps = [r["step"] for r in records if "total" in r]
    assert train_steps == [1, 2, 3]
    (events,) = glob.glob(os.path.join(cfg.run_dir, "tensorboard", "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("total")] == train_steps
    totals = [r["total"] for r in records if "total" in r]
    assert all(abs(e.value - t) <= 1e-6 * abs(t) for e, t in zip(acc.Scalars("total"), totals))  # float32
    assert acc.Scalars("eval/psnr_ema")[-1].step == 3 and "eval/grid" in acc.Tags()["images"]
    (offline,) = glob.glob(os.path.join(cfg.run_dir, "wandb", "offline-run-*"))
    (history,) = glob.glob(os.path.join(offline, "run-*.wandb"))
    data = open(history, "rb").read()
    assert b"eval/psnr_ema" in data and b"total" in data


def test_progress_lines_every_n_seconds_with_rate_and_time_left():
    now = [0.0]
    lines = ProgressLines(total=1000, start=100, images_per_step=256, every_s=60, clock=lambda: now[0])
    now[0] = 30.0
    assert lines.update(150) is None  # not yet a minute
    now[0] = 60.0
    assert lines.update(200) == "progress: step 200/1000 (20.0%), 426.7 img/s, 8m00s left"
    now[0] = 60.0 + 3600
    assert lines.update(300).endswith("(30.0%), 7.1 img/s, 7h00m left")
