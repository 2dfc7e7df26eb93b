"""Which samples each rank reads, in which order: computed from (seed, epoch, rank, world) alone.

Every loader (FFCV, the PIL fallback, the latent cache) takes these index lists as they are, so the
order does not depend on the loader, a resumed run skips exactly the batches it has trained on, and
the same seed gives the same epoch on any machine.
"""
from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every rank, reproducible from (seed, epoch), new each epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def steps_per_epoch(n: int, batch: int, world: int) -> int:
    return n // (batch * world)


def rank_batches(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """Training: this rank's per-step index lists, disjoint from the other ranks'; the last partial
    global batch is dropped (every step has the same size on every rank)."""
    order = epoch_order(n, seed, epoch)
    steps = steps_per_epoch(n, batch, world)
    return order[: steps * batch * world].view(steps, world, batch)[:, rank].tolist()


def sequential_batches(ids, size: int) -> list[list[int]]:
    """`ids` in order, in batches of `size` (the last may be short): evaluation and one-pass encoding."""
    ids = list(ids)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def eval_batches(n: int, batch: int, rank: int, world: int) -> list[list[int]]:
    """Evaluation: rank r reads a contiguous r-th share of range(n), in order, nothing dropped, so the
    ranks together see every sample exactly once (shares differ by at most one sample)."""
    start, end = rank * n // world, (rank + 1) * n // world
    return sequential_batches(range(start, end), batch)


def evenly_spaced(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n), first and last included. Datasets are sorted by class,
    so a subset taken this way covers every class where the first `count` would cover a few."""
    return torch.linspace(0, n - 1, min(n, count)).round().long().unique().tolist()
