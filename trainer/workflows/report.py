"""`rectok report RUN`: the pictures of one run, in RUN/pictures/ (a sweep's pictures, drawn with the same
helpers: slurm/sweep_results.py).

A tokenizer run gets reconstructions, latent PCA and cosine maps, and t-SNE of x_t along the flow
(validation images spread over the classes); a DiT run gets samples by class and guidance scale
(the same noise down each column); both get their tracked evaluation metrics against epochs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from data import DataError, evenly_spaced, load_batch, to_model_range
from trainer.config.recipes import parse_saved_config
from trainer.config.tree import ConfigError
from trainer.engine.checkpoint import read_meta, run_dir_of, saved_config
from trainer.engine.distributed import resolve_device
from trainer.engine.tracking import read_metrics
from trainer.evaluation.pictures import labelled_grid, latent_maps, metric_curves, tsne_flow
from trainer.evaluation.probe import encode_split, standardise
from trainer.tasks.latents import FrozenTokenizer
from trainer.tasks.sampling import load_sampler
from trainer.tasks.splits import open_split

log = logging.getLogger("rectok")

PICTURES = "pictures"
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0)
FLOW_TIMES = (1.0, 0.75, 0.5, 0.25)


def class_names(source, count: int) -> list[str]:
    names = list(getattr(source, "classes", None) or [])
    return [names[i] if i < len(names) else str(i) for i in range(count)]


def eval_keys(records: list[dict]) -> list[str]:
    """Numeric evaluation keys of a run's records, FIDs first."""
    keys = {k for r in records for k, v in r.items()
            if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(keys, key=lambda k: ("fid" not in k, k))


def metrics_picture(run_dir: str, path: str, title: str) -> str | None:
    records = read_metrics(run_dir, missing_ok=True)
    keys = eval_keys(records)
    return metric_curves({os.path.basename(run_dir): records}, keys, path, title) if keys else None


@torch.no_grad()
def tokenizer_pictures(checkpoint: str, out: str, overrides: list[str] = (), num_images: int = 8,
                       tsne_images: int = 1000, use_ema: bool = True, progress: bool = True) -> dict:
    cfg = saved_config(checkpoint, list(overrides), task="tokenizer")
    device = resolve_device(cfg.run.device)
    tok = FrozenTokenizer(checkpoint, use_ema).to(device)
    weights = "EMA" if use_ema else "raw"
    val = open_split(cfg, "val")
    images, labels = load_batch(val, evenly_spaced(len(val), num_images), cfg.data.num_workers)
    x = to_model_range(images, device)
    z = tok.moments(x)[0]
    rec = tok.decode(z)
    names = class_names(val, int(max(val.labels)) + 1)
    cols = [names[int(y)] for y in labels]
    what = f"{os.path.basename(run_dir_of(checkpoint))} ({weights})"
    out_files = {
        "reconstructions": labelled_grid(torch.stack([x.cpu(), rec.float().cpu()]),
                                         os.path.join(out, "reconstructions.png"),
                                         ["original", "reconstruction"], cols, f"Reconstructions: {what}"),
        "latent_maps": latent_maps(x.cpu(), z.float().cpu(), os.path.join(out, "latent_maps.png"), cols,
                                   f"Latent tokens: {what}"),
    }
    zs, ys = encode_split(tok, val, evenly_spaced(len(val), tsne_images), cfg.sample.batch_size, device,
                          cfg.data.num_workers, progress)
    out_files["tsne_flow"] = tsne_flow(standardise(zs, zs)[0], ys, os.path.join(out, "tsne_flow.png"), names,
                                       FLOW_TIMES, cfg.run.seed, f"t-SNE of x_t along the flow: {what}")
    return out_files


@torch.no_grad()
def dit_pictures(checkpoint: str, out: str, overrides: list[str] = (), num_classes: int = 10,
                 scales: tuple[float, ...] = GUIDANCE_SCALES, use_ema: bool = True) -> dict:
    sampler = load_sampler(checkpoint, list(overrides), use_ema)
    cfg, p = sampler.cfg, sampler.cfg.sample
    kind = p.guidance if p.guidance != "none" else "cfg" if cfg.dit.label_drop > 0 else "none"
    if kind == "none":  # trained without label dropout: no unconditional model to guide with
        scales = (1.0,)
    classes = evenly_spaced(cfg.dit.num_classes, num_classes)
    try:
        names = class_names(open_split(cfg, "val"), cfg.dit.num_classes)
    except (DataError, ConfigError, FileNotFoundError):  # the dataset need not be on this machine
        names = [str(c) for c in range(cfg.dit.num_classes)]
    labels = torch.tensor(classes)
    rows = [sampler(labels, range(len(classes)),  # the same indices: the same noise down each column
                    sample=replace(p, guidance="none" if w == 1 else kind, scale=w)) for w in scales]
    title = f"Samples: {os.path.basename(run_dir_of(checkpoint))}, {p.steps} steps" + \
        (f", guide {os.path.basename(p.guide)}" if kind == "autoguidance" else "")
    path = labelled_grid(torch.stack(rows), os.path.join(out, "samples_by_class.png"),
                         [f"w = {w:g}" + (f" ({kind})" if w != 1 else " (none)") for w in scales],
                         [names[c] for c in classes], title)
    return {"samples_by_class": path}


def run_report(run: str, out: str | None = None, overrides: list[str] = (), columns: int = 0,
               use_ema: bool = True, progress: bool = True) -> dict:
    """Every picture of a tokenizer or DiT run (directory or checkpoint) into OUT (RUN/pictures).
    `columns`: images (tokenizer, 8) or classes (DiT, 10) across the grids."""
    run_dir = run_dir_of(run)
    out = out or os.path.join(run_dir, PICTURES)
    cfg = parse_saved_config(read_meta(run)["config"])
    if cfg.task == "tokenizer":
        files = tokenizer_pictures(run, out, overrides, columns or 8, use_ema=use_ema, progress=progress)
    else:
        files = dit_pictures(run, out, overrides, columns or 10, use_ema=use_ema)
    curves = metrics_picture(run_dir, os.path.join(out, "metrics.png"), f"Tracked evaluation: {run_dir}")
    if curves:
        files["metrics"] = curves
    log.info("pictures of %s: %s", run_dir, ", ".join(files.values()))
    return files

