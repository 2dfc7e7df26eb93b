"""`rectok import-official` and `rectok export --official`: the released RecTok and DiT^DH files <-> our runs.

An import writes what a training run leaves: RUN/config.yaml and RUN/checkpoints/step_00000000 with
meta.json and a DCP state (modules.generator = the file's raw weights, ema = its EMA weights), without
optimizer state. Sampling, evaluation, reports and latent caching read it like our own runs; training
starts from it through tokenizer.init_from (stage 2) or dit.init_from (fine-tuning), with a fresh optimizer.
Key layouts live in models/released_layout.py; this file chooses configs and writes runs.
"""
from __future__ import annotations

import logging
import os
import re
import shutil

import torch

from data.files import atomic_output, write_text
from models.released_layout import (
    OFFICIAL_TEACHERS,
    Converted,
    OfficialLayoutError,
    check_layout,
    dit_from_official,
    dit_to_official,
    official_teacher_key,
    tokenizer_from_official,
    tokenizer_to_official,
    weight_sets,
)
from models.weights import read_checkpoint
from trainer.config.recipes import dump_config, load_config, parse_saved_config
from trainer.config.schema import TrainConfig
from trainer.config.tree import ConfigError
from trainer.engine.checkpoint import checkpoint_root, latest_checkpoint, read_meta, resolve_checkpoint, save_checkpoint
from trainer.engine.distributed import DistEnv
from trainer.parallel.consolidate import load_state
from trainer.parallel.torch_strategy import TorchStrategy, save_dcp_weights
from trainer.tasks.sampling import build_dit

log = logging.getLogger(__name__)

AUTOGUIDANCE_SCALE = 1.29  # docs/reference.md §2.4: the headline's AutoGuidance weight with the 30-epoch DiT^DH-S
DIT_RECIPES = {"T": "dit/tiny_dit", "S": "dit/ditdh_s", "B": "dit/ditdh_b", "L": "dit/ditdh_l", "XL": "dit/ditdh_xl"}
GUIDE_RECIPE = "dit/ditdh_s_guide_30ep"
STATS_NOTE = ("The released files hold no latent statistics. They are computed from the DiT config's data.train "
              "on first use (`rectok cache-latents DIT_RUN/config.yaml`, or the first `rectok sample` / training run) "
              "and kept beside the tokenizer checkpoint as latent_stats.json; dit.stats=FILE uses a file you have.")


def _convert(path: str, what: str, convert, trust_pickle: bool) -> tuple[Converted, Converted, str]:
    """The file's raw and EMA weights in our layout (one conversion when the file holds one set)."""
    raw, ema, source = weight_sets(read_checkpoint(path, what, trust_pickle))
    try:
        c_ema = convert(ema)
        c_raw = c_ema if raw is ema else convert(raw)
    except OfficialLayoutError as e:
        raise OfficialLayoutError(f"{what} {path}: {e}") from None
    if c_raw.arch != c_ema.arch:
        raise OfficialLayoutError(f"{what} {path}: model and model_ema differ: {c_raw.arch} vs {c_ema.arch}")
    return c_raw, c_ema, source


def _checked(model: torch.nn.Module, path: str, what: str, *sets: Converted) -> None:
    for c in sets:
        try:
            check_layout(model, c)
        except OfficialLayoutError as e:
            raise OfficialLayoutError(f"{what} {path}: {e}") from None


def _run_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(path))[0])


def write_imported_run(cfg: TrainConfig, raw: Converted, ema: Converted, meta: dict, force: bool) -> str:
    run_dir = cfg.run_dir
    if latest_checkpoint(run_dir):
        if not force:
            raise ConfigError(f"{run_dir} already holds a checkpoint; --force replaces its checkpoints")
        shutil.rmtree(checkpoint_root(run_dir))
    write_text(os.path.join(run_dir, "config.yaml"), dump_config(cfg))
    weights = {k: {n: t.float().contiguous() for n, t in c.state.items()} for k, c in (("raw", raw), ("ema", ema))}
    if raw is ema:
        weights["raw"] = {n: t.clone() for n, t in weights["ema"].items()}  # DCP writes each tensor once
    meta = {"epoch": 0.0, "format": TorchStrategy.format, "strategy": "ddp", "config": dump_config(cfg), **meta}
    save_checkpoint(run_dir, 0, lambda d: save_dcp_weights(d, {"modules": {"generator": weights["raw"]},
                                                                "ema": weights["ema"]}),
                    meta, env=DistEnv())
    return run_dir


def import_summary(run_dir: str, path: str, name: str, source: str, c: Converted) -> dict:
    return {"run": run_dir, "file": path, "model": name, "weights": source, "tensors": len(c.state),
            "parameters": sum(t.numel() for t in c.state.values()), "notes": c.notes}


def import_tokenizer(path: str, out_dir: str, recipe: str | None = None, overrides: list[str] = (),
                     trust_pickle: bool = False, force: bool = False) -> dict:
    """RecTok.pth (stage 1, with the semantic decoder) or RecTok_decft.pth -> a tokenizer run."""
    what = "official RecTok checkpoint"
    raw, ema, source = _convert(path, what, tokenizer_from_official, trust_pickle)
    arch = ema.arch
    stage1 = arch["semantic_decoder"] != "none"
    recipe = recipe or ("rectok/stage1_d128" if stage1 else "rectok/stage2_decoder_ft")
    fixed = [f"model.name={arch['name']}", f"model.latent_channels={arch['latent_channels']}",
             f"model.image_size={arch['image_size']}", f"model.patch_size={arch['patch_size']}",
             f"model.semantic_decoder={arch['semantic_decoder']}", f"run.output_dir={out_dir}",
             f"run.name={_run_name(path)}"]
    cfg = load_config(recipe, fixed + list(overrides))
    if stage1 and official_teacher_key(cfg.teacher.name) != ema.teacher_key:
        if ema.teacher_key not in OFFICIAL_TEACHERS:
            raise ConfigError(f"{path}: semantic decoder for teacher {ema.teacher_key!r}, which has no entry here "
                              f"({', '.join(OFFICIAL_TEACHERS)}); set teacher.name")
        cfg = load_config(recipe, fixed + [f"teacher.name={OFFICIAL_TEACHERS[ema.teacher_key]}"] + list(overrides))
    if cfg.tokenizer.stage == 2:
        cfg.tokenizer.init_from = os.path.abspath(path)  # provenance: these weights, fine-tuned as stage 2
    with torch.device("meta"):
        _checked(ema.build(), path, what, raw, ema)
    run_dir = write_imported_run(cfg, raw, ema, {"imported_from": os.path.abspath(path), "weights": source}, force)
    return import_summary(run_dir, path, arch["name"], source, ema)


def tokenizer_config_of(run: str) -> TrainConfig:
    try:
        saved = parse_saved_config(read_meta(run)["config"])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"dit.tokenizer: {e}") from None
    if saved.task != "tokenizer":
        raise ConfigError(f"dit.tokenizer: {resolve_checkpoint(run)} holds a {saved.task!r} run, not a tokenizer")
    return saved


def import_dit(path: str, out_dir: str, recipe: str | None = None, overrides: list[str] = (), size: str | None = None,
               tokenizer_run: str | None = None, guide_run: str | None = None, trust_pickle: bool = False,
               force: bool = False, name: str | None = None) -> dict:
    """A released DiT^DH file -> a DiT run on the latents of `tokenizer_run` (or dit.tokenizer in overrides);
    with `guide_run`, its sampler defaults to AutoGuidance by that run at w = 1.29."""
    what = "official DiT^DH checkpoint"
    raw, ema, source = _convert(path, what, lambda sd: dit_from_official(sd, size), trust_pickle)
    arch = ema.arch
    fixed = [f"model.name={arch['name']}", f"model.latent_channels={arch['latent_channels']}",
             f"dit.num_classes={arch['num_classes']}", f"run.output_dir={out_dir}",
             f"run.name={name or _run_name(path)}"]
    if tokenizer_run:
        fixed.append(f"dit.tokenizer={tokenizer_run}")
    elif not any(o.startswith("dit.tokenizer=") for o in overrides):
        raise ConfigError(f"{path}: a DiT samples and trains through its tokenizer: import it alongside "
                          f"(--tokenizer FILE) or name an imported one (dit.tokenizer=RUN)")
    if guide_run:
        fixed += ["sample.guidance=autoguidance", f"sample.guide={guide_run}", f"sample.scale={AUTOGUIDANCE_SCALE}"]
    size_key = arch["name"].removeprefix("DiTDH-")
    cfg = load_config(recipe or DIT_RECIPES[size_key], fixed + list(overrides))
    m, tok = cfg.model, tokenizer_config_of(cfg.dit.tokenizer)
    if m.image_size // m.patch_size != arch["grid"]:
        raise ConfigError(f"model.image_size / patch_size = {m.image_size} / {m.patch_size} gives a "
                          f"{m.image_size // m.patch_size}x{m.image_size // m.patch_size} grid; {path} works on "
                          f"{arch['grid']}x{arch['grid']} latents")
    tm = tok.model
    if (tm.latent_channels, tm.image_size // tm.patch_size) != (m.latent_channels, arch["grid"]):
        raise ConfigError(f"dit.tokenizer: {cfg.dit.tokenizer} makes {tm.image_size // tm.patch_size}x"
                          f"{tm.image_size // tm.patch_size}x{tm.latent_channels} latents; {path} works on "
                          f"{arch['grid']}x{arch['grid']}x{m.latent_channels}")
    with torch.device("meta"):
        model = build_dit(cfg)
    _checked(model, path, what, raw, ema)
    run_dir = write_imported_run(cfg, raw, ema, {"imported_from": os.path.abspath(path), "weights": source}, force)
    return import_summary(run_dir, path, arch["name"], source, ema)


def import_official(tokenizer: str | None = None, dit: str | None = None, guide: str | None = None,
                    size: str | None = None, out_dir: str = "runs/official", tokenizer_config: str | None = None,
                    dit_config: str | None = None, guide_config: str | None = None, overrides: list[str] = (),
                    trust_pickle: bool = False, force: bool = False) -> dict:
    """`rectok import-official`: any of the tokenizer, the DiT and its AutoGuidance guide, linked together."""
    if not (tokenizer or dit or guide):
        raise ConfigError("import-official: give --tokenizer FILE, --dit FILE (and --guide FILE), or several")
    if guide and not dit:
        raise ConfigError("import-official: --guide is the AutoGuidance model of a --dit file; give both")
    out: dict = {}
    tokenizer_run = None
    if tokenizer:
        out["tokenizer"] = import_tokenizer(tokenizer, out_dir, tokenizer_config, overrides, trust_pickle, force)
        tokenizer_run = out["tokenizer"]["run"]
    guide_run = None
    if guide:
        name = _run_name(guide) + ("_guide" if _run_name(guide) == _run_name(dit) else "")
        out["guide"] = import_dit(guide, out_dir, guide_config or GUIDE_RECIPE, overrides, None, tokenizer_run,
                                  None, trust_pickle, force, name)
        guide_run = out["guide"]["run"]
    if dit:
        out["dit"] = import_dit(dit, out_dir, dit_config, overrides, size, tokenizer_run, guide_run, trust_pickle,
                                force)
    if dit or tokenizer:
        out["latent_statistics"] = STATS_NOTE
    for kind, result in out.items():
        if isinstance(result, dict):
            log.info("imported %s %s -> %s (%s)%s", kind, result["file"], result["run"], result["weights"],
                     "".join(f"; {n}" for n in result["notes"]))
    return out


def export_official(checkpoint: str, out: str) -> dict:
    """`rectok export CHECKPOINT --official`: raw and EMA weights in the released layout, a .pth with `model`
    and `model_ema` (the released code loads it; a tokenizer's teacher is not included)."""
    state = load_state(checkpoint)
    cfg = parse_saved_config(state["config"])
    if cfg.task == "tokenizer":
        def convert(sd: dict) -> dict:
            return tokenizer_to_official(sd, official_teacher_key(cfg.teacher.name))
    else:
        def convert(sd: dict) -> dict:
            return dit_to_official(sd, cfg.model.name)
    obj = {"model": convert(state["modules"]["generator"]), "model_ema": convert(state["ema"])}
    with atomic_output(out) as tmp:
        torch.save(obj, tmp)
    return {"out": out, "model": cfg.model.name, "step": state["step"], "tensors": len(obj["model_ema"]),
            "source": resolve_checkpoint(checkpoint)}
