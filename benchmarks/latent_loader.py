"""DiT input throughput: cached latents vs encoding images online, measured in the same run.

Both paths run the trainer's own code (DiTTask.prepare: flip bit, posterior sample, normalisation)
over the same images, single-threaded with no loader workers, so samples/s is samples/s per core.
The cache is built first (statistics pass + both flips, all cores). The tokenizer has random
weights of the real shape (no weights can be downloaded here): its speed, not its quality, is
what is measured.

    .venv/bin/python benchmarks/latent_loader.py                       # RecTok-BB, 256 px, C = 128
    .venv/bin/python benchmarks/latent_loader.py --tokenizer RecTok-TT --image-size 32 --channels 16
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def make_tokenizer_checkpoint(root: str, name: str, channels: int, image_size: int, patch: int) -> str:
    from models import build_model
    from trainer.config.recipes import dump_config, load_config
    cfg = load_config("rectok/tiny_stage1", [f"model.name={name}", f"model.latent_channels={channels}",
                                             f"model.image_size={image_size}", f"model.patch_size={patch}",
                                             "loss.gan_weight=0", "loss.semantic_weight=0"])
    model = build_model(name, latent_channels=channels, image_size=image_size, patch_size=patch,
                        semantic_decoder="none")
    path = os.path.join(root, "tokenizer.pt")
    torch.save({"config": dump_config(cfg), "ema": model.state_dict(), "modules": {"model": model.state_dict()}}, path)
    return path


def rate(task, dataset, count: int, batch: int) -> float:
    from data import rank_batches
    batches = rank_batches(len(dataset), batch, 0, 0, 0, 1)[: max(1, count // batch)]
    task.prepare(*next(dataset.batches(batches[:1], 0))[:2])  # warm-up
    start, n = time.perf_counter(), 0
    for x, y, _ in dataset.batches(batches, 0):
        z, _ = task.prepare(x, y)
        n += z.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="RecTok-BB")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--images", type=int, default=100, help="dataset size (cached once, read in random order)")
    p.add_argument("--online-images", type=int, default=32, help="images encoded online (slow on CPU)")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    from data import ensure_default_dataset
    from trainer.config.recipes import load_config
    from trainer.tasks.dit import DiTTask
    from trainer.tasks.latents import cache_latents
    with tempfile.TemporaryDirectory() as root:
        data_dir = ensure_default_dataset(os.path.join(root, "data"), args.image_size,
                                          per_class_train=-(-args.images // 10), per_class_val=1)
        tok = make_tokenizer_checkpoint(root, args.tokenizer, args.channels, args.image_size, args.patch_size)
        over = [f"run.output_dir={root}", f"data.train={data_dir}/train", "data.loader=pil", f"dit.tokenizer={tok}",
                "model.name=DiTDH-T",
                f"model.latent_channels={args.channels}", f"model.image_size={args.image_size}",
                f"model.patch_size={args.patch_size}", "data.num_workers=0", "dit.num_classes=10"]
        cfg = load_config("dit/tiny_dit", over)
        t0 = time.perf_counter()
        info = cache_latents(cfg, torch.device("cpu"), args.batch)
        cache_s = time.perf_counter() - t0  # statistics pass + cache pass (both flips), all cores
        torch.set_num_threads(1)  # the rates below are per core
        cache_task = DiTTask(cfg, torch.device("cpu"))
        cached = rate(cache_task, cache_task.train_set, info["count"], args.batch)
        online_task = DiTTask(load_config("dit/tiny_dit", over + ["dit.latents=online"]), torch.device("cpu"))
        online = rate(online_task, online_task.train_set, args.online_images, args.batch)
    out = {"tokenizer": args.tokenizer, "image_size": args.image_size, "latent_channels": args.channels,
           "images": info["count"], "threads": 1, "loader_workers": 0,
           "cached_samples_per_s_per_core": round(cached, 1), "online_samples_per_s_per_core": round(online, 2),
           "ratio_cached_over_online": round(cached / online, 1),
           "cache_build_s_incl_stats_all_cores": round(cache_s, 1), "cores": os.cpu_count(), "device": "cpu"}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
