"""The pictures people look at, as PNG files: labelled image grids (reconstructions, samples by class
and guidance scale), latent PCA and cosine-similarity maps (the paper's Figures 4, 8, 9), t-SNE of
x_t along the flow (Figure 7), metric curves against epochs and metrics against a sweep's setting
(Table 2, Figure 1b).

Tensors in, files out: what to draw is decided in trainer/workflows/report.py. matplotlib runs headless (Agg), as
on a cluster node.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .images import enlarged, to_uint8_hwc
from .probe import noised, pooled

CELL_INCHES = 0.9  # one image of a grid, whatever its pixel size
DISPLAY_SIDE = 64  # pixels: tiny images are enlarged (nearest) to this so they stay visible


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend, which must be chosen before pyplot is imported."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _suptitle(fig, title: str) -> None:
    if title:
        fig.suptitle(title, fontsize=9, y=1.03)  # above the panels' own titles


def labelled_grid(images: torch.Tensor, path: str, row_labels: list[str], col_labels: list[str],
                  title: str = "") -> str:
    """images [R, C, 3, H, W] in [-1, 1] as one grid with row and column labels."""
    plt = _pyplot()
    r, c = images.shape[:2]
    cells = to_uint8_hwc(enlarged(images.flatten(0, 1), DISPLAY_SIDE))  # [R*C, H, W, 3]
    h, w, pad = cells.shape[1], cells.shape[2], 2
    canvas = np.full((r * (h + pad) - pad, c * (w + pad) - pad, 3), 255, np.uint8)
    for i, cell in enumerate(cells):
        y, x = divmod(i, c)
        canvas[y * (h + pad):y * (h + pad) + h, x * (w + pad):x * (w + pad) + w] = cell
    fig, ax = plt.subplots(figsize=(CELL_INCHES * c + 1.5, CELL_INCHES * r + 0.6))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([x * (w + pad) + w / 2 for x in range(c)], col_labels, fontsize=7, rotation=30)
    ax.set_yticks([y * (h + pad) + h / 2 for y in range(r)], row_labels, fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9, pad=24)
    return _save(fig, path)


def latent_pca(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, h, w, 3] in [0, 1]: every token projected on the first three
    principal components of all tokens of the batch, each component min-max scaled."""
    tokens = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    tokens = tokens - tokens.mean(0)
    _, _, v = torch.linalg.svd(tokens, full_matrices=False)
    proj = tokens @ v[:3].T
    if proj.shape[1] < 3:  # fewer than three channels
        proj = torch.cat([proj, proj.new_zeros(len(proj), 3 - proj.shape[1])], 1)
    lo, hi = proj.min(0).values, proj.max(0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-8)
    return proj.reshape(z.shape[0], z.shape[2], z.shape[3], 3)


def cosine_to_token(z: torch.Tensor, row: int | None = None, col: int | None = None) -> torch.Tensor:
    """[B, C, h, w] -> [B, h, w]: cosine similarity of every token to the token at (row, col) of the
    same image (default: the centre)."""
    row = z.shape[2] // 2 if row is None else row
    col = z.shape[3] // 2 if col is None else col
    zn = F.normalize(z.float(), dim=1)
    return (zn * zn[:, :, row:row + 1, col:col + 1]).sum(1)


def latent_maps(images: torch.Tensor, z: torch.Tensor, path: str, col_labels: list[str], title: str = "") -> str:
    """Images over the PCA colouring of their latent tokens over the cosine similarity of each token
    to the centre token (marked)."""
    plt = _pyplot()
    b, h, w = z.shape[0], z.shape[2], z.shape[3]
    pca, cos = latent_pca(z).numpy(), cosine_to_token(z).numpy()
    shown = to_uint8_hwc(enlarged(images, DISPLAY_SIDE))
    fig, axes = plt.subplots(3, b, figsize=(CELL_INCHES * b + 1.2, CELL_INCHES * 3 + 0.8), squeeze=False)
    for i in range(b):
        axes[0, i].imshow(shown[i], interpolation="nearest")
        axes[1, i].imshow(pca[i], interpolation="nearest")
        im = axes[2, i].imshow(cos[i], cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
        axes[2, i].plot([w // 2], [h // 2], marker="x", color="red", markersize=4)
        axes[0, i].set_title(col_labels[i] if i < len(col_labels) else "", fontsize=7)
    for ax, name in zip(axes[:, 0], ("image", "latent PCA", "cosine to\ncentre token")):
        ax.set_ylabel(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[2, :].tolist(), fraction=0.02, pad=0.01)
    _suptitle(fig, title)
    return _save(fig, path)


def tsne(features: torch.Tensor, seed: int = 0) -> np.ndarray:
    """[N, D] -> [N, 2] t-SNE embedding (scikit-learn; perplexity clipped for small N)."""
    from sklearn.manifold import TSNE  # scikit-learn is slow to import and only t-SNE needs it
    n = len(features)
    perplexity = float(min(30, max(2, (n - 1) // 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features.double().numpy())


def tsne_flow(z: torch.Tensor, labels: torch.Tensor, path: str, class_names: list[str],
              times: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25), seed: int = 0, title: str = "") -> str:
    """One t-SNE panel of x_t = t z + (1 - t) eps (all tokens) per flow time t, points coloured by class."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(times), figsize=(3 * len(times), 3.2), squeeze=False)
    k = int(labels.max()) + 1
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "hsv", k)
    for ax, t in zip(axes[0], times):
        xy = tsne(pooled(noised(z, t, seed), "flatten"), seed)
        for c in range(k):
            m = (labels == c).numpy()
            ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(c), label=class_names[c] if c < len(class_names) else c)
        ax.set_title(f"t = {t:g}" + (" (data)" if t == 1 else " (noise)" if t == 0 else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if k <= 20:
        axes[0, -1].legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    _suptitle(fig, title)
    return _save(fig, path)


def _panels(n: int, width: float = 3.2):
    plt = _pyplot()
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 2.6 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.6, wspace=0.3)  # a row's x labels clear the titles of the row below
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def metric_curves(runs: dict[str, list[dict]], keys: list[str], path: str, title: str = "") -> str:
    """One panel per metric key: its value against epochs (steps where a record has no epoch), one line
    per run."""
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys):
        for name, records in runs.items():
            pts = [(r.get("epoch", r["step"]), r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=name)
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("epoch" if all("epoch" in r for rs in runs.values() for r in rs) else "step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize=6)
    _suptitle(fig, title)
    return _save(fig, path)


def metrics_against(xs: list, values: dict[str, list], x_label: str, path: str, title: str = "") -> str:
    """One panel per metric: its value (None = not measured) against a sweep's setting."""
    fig, axes = _panels(len(values))
    numeric = all(isinstance(x, (int, float)) for x in xs)
    for ax, (key, ys) in zip(axes, values.items()):
        pts = [(x if numeric else i, y) for i, (x, y) in enumerate(zip(xs, ys)) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o")
        if numeric and len(set(xs)) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)  # latent dims 16..128, model sizes
        ax.set_xticks(xs if numeric else range(len(xs)), [str(x) for x in xs], fontsize=7)
        ax.set_title(key, fontsize=8)
        ax.set_xlabel(x_label, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _suptitle(fig, title)
    return _save(fig, path)
