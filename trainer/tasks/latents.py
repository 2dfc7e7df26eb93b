"""RecTok latents for DiT training: the frozen tokenizer, latent statistics and the latent cache
(docs/reference.md §1.12, §3).

Cache layout (one directory per tokenizer and dataset split):
  manifest.json                  tokenizer content hash, C, grid, resolution, count, shard list, complete
  labels.npy                     int64 class labels in dataset order
  shard_<hash12>_<i>.bin         bf16 bits [n, flip (0 = as is, 1 = mirrored), (mean, logvar), C, h, w]
Each shard is written under a temporary name and renamed when whole (data/files.py), so an interrupted run resumes
by redoing only the shards that are missing. Shard names carry the tokenizer hash, so shards of
another tokenizer are never read as this one's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from data import DataError, TorchBatches, sequential_batches, to_model_range
from data.files import atomic_output, write_bytes, write_json
from models import build_model
from models.rectok import without_semantic_decoder
from trainer.config.recipes import parse_saved_config
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError
from trainer.engine.checkpoint import resolve_checkpoint, verified_checkpoint
from trainer.engine.distributed import barrier, broadcast_str, rank_and_world
from trainer.engine.tracking import bar_disabled
from trainer.parallel.consolidate import load_state, model_weights

from .splits import open_split

log = logging.getLogger(__name__)

MANIFEST, LABELS, FORMAT = "manifest.json", "labels.npy", 1


class ForeignCacheError(RuntimeError):
    """A latent cache (or statistics file) written by a different tokenizer or for different data."""


def tokens_to_grid(z: torch.Tensor, grid: int) -> torch.Tensor:
    """Tokenizer latents [B, N, C] (row-major tokens) -> the DiT layout [B, C, h, w]."""
    return z.transpose(1, 2).reshape(z.shape[0], z.shape[2], grid, grid)


def grid_to_tokens(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(2).transpose(1, 2)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) in name order: the same weights give the same hash
    whatever file they came from."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenTokenizer(nn.Module):
    """The encoder and pixel decoder of a trained tokenizer checkpoint, frozen, with its content hash."""

    def __init__(self, path: str, use_ema: bool = True):
        super().__init__()
        self.path = verified_checkpoint(path)  # of a run directory: its newest checkpoint that verifies
        state = load_state(self.path)
        if "config" not in state or "ema" not in state:
            raise ConfigError(f"{self.path} is not a tokenizer checkpoint written by this trainer")
        cfg = parse_saved_config(state["config"])
        if cfg.task != "tokenizer":
            raise ConfigError(f"{self.path} holds a {cfg.task!r} run, not a tokenizer")
        m = cfg.model
        self.model = build_model(m.name, latent_channels=m.latent_channels, image_size=m.image_size,
                                 patch_size=m.patch_size, semantic_decoder="none")
        weights = without_semantic_decoder(model_weights(state, use_ema))
        self.model.load_state_dict(weights)
        self.model.eval().requires_grad_(False)
        self.hash = state_hash(weights)
        self.latent_channels, self.image_size, self.grid = m.latent_channels, m.image_size, self.model.grid

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never leaves eval mode

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> posterior (mean, logvar), fp32, each [B, C, h, w]."""
        post = self.model.encode(images.float())
        return tokens_to_grid(post.mean, self.grid), tokens_to_grid(post.logvar, self.grid)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents [B, C, h, w] -> images in [-1, 1]."""
        return self.model.decode(grid_to_tokens(z.float())).clamp(-1, 1)


def check_tokenizer_fits(tok: FrozenTokenizer, cfg: TrainConfig) -> None:
    """The DiT config must describe the latents this tokenizer makes."""
    if tok.latent_channels != cfg.model.latent_channels:
        raise ConfigError(f"model.latent_channels: {cfg.model.latent_channels}, but the tokenizer {tok.path} "
                          f"makes C = {tok.latent_channels} latents")
    if tok.image_size != cfg.model.image_size or tok.grid != cfg.model.image_size // cfg.model.patch_size:
        raise ConfigError(f"model.image_size/patch_size: {cfg.model.image_size}/{cfg.model.patch_size}, but the "
                          f"tokenizer {tok.path} works at {tok.image_size} px with a {tok.grid}x{tok.grid} grid")


def check_labels(dataset, num_classes: int) -> None:
    """Labels index the DiT's label table, whose extra last row is the null class of guidance: a label
    equal to dit.num_classes would train silently as the null class, a larger one fails mid-training
    (issue 22). Checked when the data is opened, over every label (they are in memory for every source)."""
    labels = np.asarray(dataset.labels)
    if not len(labels) or 0 <= labels.min() and labels.max() < num_classes:
        return
    manifest = getattr(dataset, "manifest", None)  # a latent cache: name the images it was made of too
    name = dataset.path + (f" (latents of {manifest['dataset']})" if manifest else "")
    if labels.min() < 0:  # no value of dit.num_classes helps: the data is wrong
        raise DataError(f"{name} holds the label {int(labels.min())}; class labels start at 0")
    classes = getattr(dataset, "classes", None)
    recorded = f", {len(classes)} classes recorded" if classes else ""
    raise ConfigError(f"dit.num_classes: {num_classes}, but the largest label of {name} is {int(labels.max())}"
                      f"{recorded}: set dit.num_classes={int(labels.max()) + 1} (the null class is label "
                      f"{num_classes})")


# -- statistics --------------------------------------------------------------------------------------

def default_beside(tokenizer_path: str, name: str) -> str:
    return os.path.join(resolve_checkpoint(tokenizer_path), name)  # inside the checkpoint directory


@torch.no_grad()
def compute_latent_stats(tok: FrozenTokenizer, dataset, batch_size: int, device: torch.device,
                         num_workers: int | str = 0, progress: bool = True, rank: int = 0, world: int = 1) -> dict:
    """Per-channel mean and std of the posterior means (centre crop, no flip, fp32 with fp64 sums).

    With world > 1 (a process group; every rank calls it) rank r encodes batches r, r + world, ... and
    the fp64 sums and counts are all-reduced: the single-process numbers (to fp64 rounding) on every
    rank, and no rank idles."""
    c = tok.latent_channels
    sums = torch.zeros(2 * c + 1, dtype=torch.float64, device=device)  # [sum, sum of squares, count]
    batches = sequential_batches(range(len(dataset)), batch_size)[rank::world]
    for images, _, _ in tqdm(dataset.batches(batches, num_workers), total=len(batches), desc="latent statistics",
                             disable=bar_disabled(progress and rank == 0), dynamic_ncols=True):
        mean, _ = tok.moments(to_model_range(images, device))
        m = mean.double().transpose(0, 1).reshape(c, -1)
        sums[:c] += m.sum(1)
        sums[c:2 * c] += m.pow(2).sum(1)
        sums[2 * c] += m.shape[1]
    if world > 1:
        dist.all_reduce(sums)
    s1, s2, count = sums[:c], sums[c:2 * c], sums[2 * c]
    mu = s1 / count
    std = (s2 / count - mu.pow(2)).clamp_min(0).sqrt()
    return {"tokenizer_hash": tok.hash, "tokenizer": tok.path, "dataset": dataset.path,
            "images": len(dataset), "mean": mu.tolist(), "std": std.tolist()}


class LatentStats:
    """normalize(z) = (z - mean_c) / std_c and its inverse, on [B, C, h, w] latents."""

    def __init__(self, mean: list[float], std: list[float], device=None):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1).clamp_min(1e-8)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


def write_latent_stats(path: str, tok: FrozenTokenizer, dataset, batch_size: int, device: torch.device,
                       num_workers: int | str = 0, rank: int = 0, world: int = 1) -> dict:
    """Computes the statistics (over `world` ranks of the process group, each its share, when world > 1)
    and writes them to `path` from rank 0; every rank sees the file once this returns."""
    log.info("computing latent statistics over %d images on %d rank(s) -> %s", len(dataset), world, path)
    stats = compute_latent_stats(tok, dataset, batch_size, device, num_workers, rank=rank, world=world)
    if rank == 0:
        write_json(path, stats)
    if world > 1:
        barrier()
    return stats


def load_or_compute_stats(path: str, tok: FrozenTokenizer, dataset, batch_size: int, device: torch.device,
                          num_workers: int | str = 0) -> LatentStats:
    """Statistics are computed once per tokenizer and kept in `path`; another tokenizer's file is refused."""
    if os.path.isfile(path):
        with open(path) as f:
            stats = json.load(f)
        if stats.get("tokenizer_hash") != tok.hash:
            raise ForeignCacheError(f"latent statistics {path} belong to another tokenizer (hash "
                                    f"{str(stats.get('tokenizer_hash'))[:12]}, this one is {tok.hash[:12]}); "
                                    f"delete the file or set dit.stats to another path")
        if dataset is not None and stats.get("dataset") != dataset.path:
            log.warning("latent statistics %s were computed on %s; training reads %s", path,
                        stats.get("dataset"), dataset.path)
    else:
        stats = write_latent_stats(path, tok, dataset, batch_size, device, num_workers)
    if len(stats["mean"]) != tok.latent_channels:
        raise ForeignCacheError(f"{path} has {len(stats['mean'])} channels, the tokenizer {tok.latent_channels}")
    return LatentStats(stats["mean"], stats["std"], device)


def prepare_latent_stats(cfg: TrainConfig, device: torch.device) -> None:
    """Every rank together, before a DiT task is built (its tokenizer_and_stats then reads the file): the
    latent statistics of dit.tokenizer, computed over the ranks when missing (rank 0 opens the training
    split first: it may generate the default dataset; rank 0 decides whether the file is there, so every
    rank takes the same branch). A no-op for other tasks, synthetic data or statistics already on disk."""
    if cfg.task != "dit" or cfg.data.synthetic:
        return
    rank, world = rank_and_world()
    missing = not os.path.isfile(stats_path_for(cfg))
    if world > 1:
        missing = bool(broadcast_str("missing" if missing else ""))
    if not missing:
        return
    if rank != 0:
        barrier()
    images = open_split(cfg, "train")
    if rank == 0 and world > 1:
        barrier()
    check_labels(images, cfg.dit.num_classes)  # every rank: refused before the tokenizer loads
    tok = FrozenTokenizer(cfg.dit.tokenizer, cfg.dit.tokenizer_use_ema).to(device)
    check_tokenizer_fits(tok, cfg)
    write_latent_stats(stats_path_for(cfg), tok, images, cfg.sample.batch_size, device, cfg.data.num_workers,
                       rank, world)  # the task's tokenizer_and_stats reads and checks the file


# -- the cache ---------------------------------------------------------------------------------------

def _shard_name(token_hash: str, index: int) -> str:
    return f"shard_{token_hash[:12]}_{index:05d}.bin"


def _expected_manifest(tok: FrozenTokenizer, dataset, shard_size: int) -> dict:
    n = len(dataset)
    shards = [{"file": _shard_name(tok.hash, i), "start": s, "count": min(shard_size, n - s)}
              for i, s in enumerate(range(0, n, shard_size))]
    return {"format": FORMAT, "tokenizer_hash": tok.hash, "tokenizer": tok.path,
            "latent_channels": tok.latent_channels, "grid": tok.grid, "image_size": tok.image_size,
            "dtype": "bfloat16", "layout": "[n, flip, (mean, logvar), C, h, w]",
            "dataset": dataset.path, "count": n, "shard_size": shard_size,
            "shards": shards, "complete": False}


def _read_manifest(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check_same_cache(found: dict, want: dict, cache_dir: str) -> None:
    if found.get("tokenizer_hash") != want["tokenizer_hash"]:
        raise ForeignCacheError(
            f"latent cache {cache_dir} was written by another tokenizer (hash {str(found.get('tokenizer_hash'))[:12]}"
            f", from {found.get('tokenizer')}); this one is {want['tokenizer_hash'][:12]} ({want['tokenizer']}). "
            f"Refusing to mix them: use another dit.cache_dir")
    for key in ("latent_channels", "grid", "count", "shard_size"):
        if found.get(key) != want[key]:
            raise ForeignCacheError(f"latent cache {cache_dir} has {key}={found.get(key)}, this run needs "
                                    f"{want[key]} (another dataset or shard size?); use another dit.cache_dir")


def _shard_bytes(count: int, tok: FrozenTokenizer) -> int:
    return count * 2 * 2 * tok.latent_channels * tok.grid * tok.grid * 2


@torch.no_grad()
def write_latent_cache(tok: FrozenTokenizer, dataset, cache_dir: str, shard_size: int, batch_size: int,
                       device: torch.device, num_workers: int = 0, rank: int = 0, world: int = 1) -> dict:
    """Encode `dataset` (both flips) into `cache_dir`; finished shards are kept, so a rerun resumes.

    Ranks split the shards (shard i belongs to rank i % world); the manifest is marked complete by
    whichever rank finds every shard in place.
    """
    os.makedirs(cache_dir, exist_ok=True)
    want = _expected_manifest(tok, dataset, shard_size)
    found = _read_manifest(cache_dir)
    if found is not None:
        _check_same_cache(found, want, cache_dir)
    foreign = [f for f in os.listdir(cache_dir)
               if f.startswith("shard_") and not f.startswith(f"shard_{tok.hash[:12]}_")]
    if foreign:
        raise ForeignCacheError(f"latent cache {cache_dir} holds shards of another tokenizer ({foreign[0]}, ...); "
                                f"refusing to mix them: use another dit.cache_dir")
    if found is None and rank == 0:
        with atomic_output(os.path.join(cache_dir, LABELS), suffix=".npy") as tmp:  # np.save appends .npy
            np.save(tmp, np.asarray(dataset.labels, dtype=np.int64))
        write_json(os.path.join(cache_dir, MANIFEST), want)
    done = skipped = 0
    mine = [s["count"] for i, s in enumerate(want["shards"]) if i % world == rank]
    bar = tqdm(total=sum(mine), desc="latent cache", unit="img", disable=bar_disabled(rank == 0),
               dynamic_ncols=True)
    for i, shard in enumerate(want["shards"]):
        final = os.path.join(cache_dir, shard["file"])
        if i % world != rank:
            continue
        if os.path.isfile(final) and os.path.getsize(final) == _shard_bytes(shard["count"], tok):
            skipped += 1
            bar.update(shard["count"])
            continue
        ids = range(shard["start"], shard["start"] + shard["count"])
        out = torch.empty(shard["count"], 2, 2, tok.latent_channels, tok.grid, tok.grid, dtype=torch.bfloat16)
        pos = 0
        for images, _, _ in dataset.batches(sequential_batches(ids, batch_size), num_workers):
            x = to_model_range(images, device)
            b = x.shape[0]
            mean, logvar = tok.moments(torch.cat([x, x.flip(-1)]))
            both = torch.stack([mean, logvar], dim=1).view(2, b, 2, *mean.shape[1:]).transpose(0, 1)
            out[pos:pos + b] = both.to(torch.bfloat16).cpu()
            pos += b
            bar.update(b)
        write_bytes(final, out.view(torch.int16).numpy().tobytes())
        done += 1
        log.info("latent cache: shard %d/%d written (%d images)", i + 1, len(want["shards"]), shard["count"])
    bar.close()
    complete = all(os.path.isfile(os.path.join(cache_dir, s["file"])) for s in want["shards"])
    if complete:
        write_json(os.path.join(cache_dir, MANIFEST), {**want, "complete": True})
    return {"cache_dir": cache_dir, "shards_written": done, "shards_reused": skipped, "complete": complete,
            "count": want["count"]}


class LatentCache(TorchBatches, Dataset):
    """Read side: item i -> (bf16 [2, 2, C, h, w] moments of both flips, label, i); one memory map per shard."""

    def __init__(self, cache_dir: str, tokenizer_hash: str | None = None):
        manifest = _read_manifest(cache_dir)
        if manifest is None:
            raise FileNotFoundError(f"no latent cache at {cache_dir} (no {MANIFEST}); run `rectok cache-latents`")
        if tokenizer_hash is not None and manifest["tokenizer_hash"] != tokenizer_hash:
            raise ForeignCacheError(
                f"latent cache {cache_dir} was written by tokenizer {manifest['tokenizer_hash'][:12]} "
                f"({manifest['tokenizer']}), not by the configured one ({tokenizer_hash[:12]})")
        if not manifest["complete"]:
            raise FileNotFoundError(f"latent cache {cache_dir} is incomplete; rerun `rectok cache-latents` to "
                                    f"finish it (finished shards are kept)")
        self.path, self.manifest = cache_dir, manifest
        self.labels = np.load(os.path.join(cache_dir, LABELS))
        self.shape = (2, 2, manifest["latent_channels"], manifest["grid"], manifest["grid"])
        self.shard_size = manifest["shard_size"]
        self._maps: dict[int, np.memmap] = {}  # opened lazily, so each loader worker maps its own

    def __len__(self) -> int:
        return self.manifest["count"]

    def _map(self, s: int) -> np.memmap:
        if s not in self._maps:
            shard = self.manifest["shards"][s]
            self._maps[s] = np.memmap(os.path.join(self.path, shard["file"]), dtype=np.int16, mode="r",
                                      shape=(shard["count"], *self.shape))
        return self._maps[s]

    def __getitem__(self, index: int):
        s, j = divmod(index, self.shard_size)
        moments = torch.from_numpy(np.array(self._map(s)[j])).view(torch.bfloat16)
        return moments, int(self.labels[index]), index

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}


# -- what a DiT config names ----------------------------------------------------------------------------

def cache_dir_for(cfg: TrainConfig) -> str:
    return cfg.dit.cache_dir or default_beside(cfg.dit.tokenizer, "latent_cache")


def stats_path_for(cfg: TrainConfig) -> str:
    return cfg.dit.stats or default_beside(cfg.dit.tokenizer, "latent_stats.json")


def tokenizer_and_stats(cfg: TrainConfig, device: torch.device, images=None):
    """The frozen tokenizer named by dit.tokenizer and its latent statistics (computed on first use)."""
    tok = FrozenTokenizer(cfg.dit.tokenizer, cfg.dit.tokenizer_use_ema).to(device)
    check_tokenizer_fits(tok, cfg)
    path = stats_path_for(cfg)
    if images is None and not os.path.isfile(path):
        images = open_split(cfg, "train")
    stats = load_or_compute_stats(path, tok, images, cfg.sample.batch_size, device, cfg.data.num_workers)
    return tok, stats


def cache_latents(cfg: TrainConfig, device: torch.device, batch_size: int, rank: int = 0, world: int = 1) -> dict:
    """`rectok cache-latents`: statistics (if missing) and the cache of the training split, resumable."""
    images = open_split(cfg, "train")
    tok, _ = tokenizer_and_stats(cfg, device, images)
    out = write_latent_cache(tok, images, cache_dir_for(cfg), cfg.dit.cache_shard_size, batch_size, device,
                             cfg.data.num_workers, rank, world)
    return {**out, "stats": stats_path_for(cfg), "tokenizer_hash": tok.hash}
