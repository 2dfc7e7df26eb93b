"""Linear probing of a tokenizer's latent space (the paper's Figure 2 and Table 2, docs/reference.md §4):
a linear classifier on frozen latent features, and on the noised x_t = t z + (1 - t) eps of the flow at a
chosen t (network convention: t = 1 is data, t = 0 noise), reporting top-1 on the validation split.

z is the posterior mean, normalised per channel with statistics of the probe's training images (as
the DiT sees latents), so the noise at t means what it means for the generator. Features are the
latent tokens average-pooled (`pool=mean`, C numbers per image: feasible at ImageNet scale) or
flattened (`pool=flatten`, C x h x w).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from data import sequential_batches, to_model_range
from trainer.engine.tracking import bar_disabled


@torch.no_grad()
def encode_split(tokenizer, source, ids, batch: int, device, num_workers: int = 0,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means [N, C, h, w] (fp32, CPU) and labels of the images `ids` of `source`."""
    zs, ys = [], []
    batches = sequential_batches(ids, batch)
    for images, labels, _ in tqdm(source.batches(batches, num_workers), total=len(batches), desc="encode",
                                  disable=bar_disabled(progress), dynamic_ncols=True):
        zs.append(tokenizer.moments(to_model_range(images, device))[0].float().cpu())
        ys.append(labels.cpu())
    return torch.cat(zs), torch.cat(ys)


def standardise(z_ref: torch.Tensor, *zs: torch.Tensor) -> list[torch.Tensor]:
    """`zs` normalised per channel with the mean and std of `z_ref` (as the DiT's latent statistics)."""
    mean = z_ref.mean((0, 2, 3), keepdim=True)
    std = z_ref.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return [(z - mean) / std for z in zs]


def noised(z: torch.Tensor, t: float, seed: int = 0) -> torch.Tensor:
    """x_t = t z + (1 - t) eps, eps ~ N(0, I) drawn from `seed` (t = 1: the clean latents)."""
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    return t * z + (1 - t) * eps


def pooled(z: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "mean":
        return z.mean((2, 3))
    if pool == "flatten":
        return z.flatten(1)
    raise ValueError(f"pool must be 'mean' or 'flatten', got {pool!r}")


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                     num_classes: int, epochs: int = 100, batch: int = 1024, lr: float = 1e-2,
                     weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Top-1 accuracy on (x_val, y_val) of a linear classifier trained on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=g).split(batch):
            loss = nn.functional.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return (head(x_val).argmax(1) == y_val).double().mean().item()
