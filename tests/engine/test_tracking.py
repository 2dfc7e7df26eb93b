"""Metrics go to metrics.jsonl, TensorBoard and (offline) wandb: read back with their own readers."""
import glob
import os

from trainer.config.recipes import load_config
from trainer.engine.tracking import read_metrics
from trainer.tasks.training import train


def test_tensorboard_and_offline_wandb_receive_the_metrics(micro, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("rectok/tiny_stage1", [*micro, "run.max_steps=3", "logging.wandb=true",
                                             "logging.wandb_mode=offline", "data.loader=pil"])
    result = train(cfg)
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
