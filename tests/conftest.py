import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """The generated default dataset, small (16 per class at 32 px), shared by the whole session."""
    from data import ensure_default_dataset
    base = str(tmp_path_factory.getbasetemp().parent / "rectok-datasets")
    ensure_default_dataset(base, image_size=32, per_class_train=16, per_class_val=4)
    return base


@pytest.fixture
def micro(tmp_path, dataset_dir):
    """Overrides turning tiny_stage1 into a seconds-long run: 32 px with patch 8, 4x4 tokens, batch 8, 20 steps/epoch.

    Teacher, LPIPS-VGG16 and ConvNeXt-S run their real code with random weights: no weights can be
    downloaded here.
    """
    return micro_overrides(tmp_path, dataset_dir)


def micro_overrides(tmp_path, dataset_dir) -> list[str]:
    """The `micro` fixture's overrides, for fixtures of a wider scope."""
    return [
        f"run.output_dir={tmp_path}", "run.name=micro", "model.image_size=32", "model.patch_size=8",
        "model.latent_channels=8",
        "teacher.name=dinov3-micro", f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16",
        "data.global_batch=8", "data.num_workers=0", "loss.convnext_size=32", "logging.progress=false",
        "logging.log_every=1", "eval.num_images=16", "eval.grid_images=4", "checkpoint.every_steps=0",
        "schedule.epochs=1", "schedule.warmup_epochs=0.1",
    ]


@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory, dataset_dir):
    """A micro tokenizer checkpoint (2 steps: its weights are what matters here, not its quality)."""
    from trainer.config.recipes import load_config
    from trainer.tasks.training import train
    out = tmp_path_factory.mktemp("tok")
    cfg = load_config("rectok/tiny_stage1", [
        f"run.output_dir={out}", "run.name=tok", "model.image_size=32", "model.patch_size=8",
        "model.latent_channels=8", "teacher.name=dinov3-micro", f"data.default_dataset_dir={dataset_dir}",
        "data.default_per_class=16", "data.global_batch=8", "data.num_workers=0", "loss.convnext_size=32",
        "logging.progress=false", "eval.num_images=8", "eval.grid_images=2", "checkpoint.every_steps=0",
        "run.max_steps=2"])
    return train(cfg)["run_dir"]


def wait_until(check, timeout_s: float, what: str, poll_s: float = 0.5):
    """Poll `check()` until it returns something truthy; fail after `timeout_s` (no test waits for ever)."""
    import time
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(poll_s)


def wait_for(job, timeout_s: float = 240):
    """A submitit job's results with a deadline: a job that dies without a result would hang `results()`."""
    wait_until(job.done, timeout_s, f"job {job.job_id} finished")
    return job.results()


def assert_png(path, min_side: int = 50) -> None:
    """`path` is a PNG file of at least min_side pixels a side that decodes completely."""
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (path, im.format, im.size)
        im.load()  # decodes every byte: a truncated file fails here
