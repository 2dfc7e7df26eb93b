"""Latent statistics computed by every rank on its share and all-reduced in fp64 (issue 23): the same
numbers as one process, the file written once, no rank idle."""
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config.recipes import load_config
from trainer.tasks.latents import FrozenTokenizer, compute_latent_stats, prepare_latent_stats
from trainer.tasks.splits import open_split


def _config(tmp_path, dataset_dir, tokenizer_run):
    return load_config("dit/tiny_dit", [
        f"run.output_dir={tmp_path}", "run.name=dit", f"dit.tokenizer={tokenizer_run}",
        f"dit.stats={tmp_path / 'stats.json'}", "model.latent_channels=8", "model.patch_size=8",
        f"data.default_dataset_dir={dataset_dir}", "data.default_per_class=16", "data.num_workers=0",
        "sample.batch_size=24", "logging.progress=false"])


def _rank(rank: int, world: int, store: str, cfg, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        encoded = []
        original = FrozenTokenizer.moments

        def counted(self, images):  # which images this rank encodes
            encoded.append(images.shape[0])
            return original(self, images)
        FrozenTokenizer.moments = counted
        prepare_latent_stats(cfg, torch.device("cpu"))
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"encoded": sum(encoded)}, f)
    finally:
        dist.destroy_process_group()


def test_latent_stats_on_two_ranks_equal_one_process(tmp_path, dataset_dir, tokenizer_run):
    cfg = _config(tmp_path, dataset_dir, tokenizer_run)
    images = open_split(cfg, "train")
    single = compute_latent_stats(FrozenTokenizer(tokenizer_run), images, 24, torch.device("cpu"), 0, progress=False)
    mp.start_processes(_rank, args=(2, str(tmp_path / "store"), cfg, str(tmp_path / "ranks")), nprocs=2,
                       start_method="spawn")
    with open(cfg.dit.stats) as f:
        both = json.load(f)
    assert both["images"] == single["images"] == len(images)
    torch.testing.assert_close(torch.tensor(both["mean"], dtype=torch.float64),
                               torch.tensor(single["mean"], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(both["std"], dtype=torch.float64),
                               torch.tensor(single["std"], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    shares = [json.load(open(tmp_path / f"ranks.{r}"))["encoded"] for r in range(2)]
    assert sum(shares) == len(images) and min(shares) >= len(images) // 2 - 24  # every rank took its share
    os.utime(cfg.dit.stats, (0, 0))
    prepare_latent_stats(cfg, torch.device("cpu"))  # present: nothing recomputed
    assert os.path.getmtime(cfg.dit.stats) == 0
