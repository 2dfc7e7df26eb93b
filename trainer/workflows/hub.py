"""`rectok export RUN --hf DIR` and `rectok import-official --hf DIR`: a run <-> a Hugging Face Hub folder.

The folder is what peers publish with `huggingface-cli upload`: model.safetensors (one weight set, EMA by
default, as `rectok export --out` writes it), config.json (the run's resolved config and what the weights
are, format tag FORMAT) and README.md (the model card). A DiT's folder also carries its latent statistics
(latent_stats.json) when the run had them. Importing writes a run directory like `import-official` does
for the released files (trainer/workflows/released.py): the one weight set as both raw and EMA weights,
checked key by key and shape by shape against the model the config builds. Nothing here touches the network
or unpickles anything.
"""
from __future__ import annotations

import json
import logging
import os
import re

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from data.files import write_bytes, write_json, write_text
from models import build_model
from models.released_layout import Converted, OfficialLayoutError, check_layout
from models.weights import UnreadableWeightsError
from trainer.config.recipes import parse_saved_config, with_overrides
from trainer.config.schema import TrainConfig, uses_teacher
from trainer.config.tree import ConfigError, from_dict, to_dict
from trainer.engine.checkpoint import resolve_checkpoint
from trainer.engine.preemption import read_done
from trainer.engine.tracking import read_metrics
from trainer.parallel.consolidate import export_weights
from trainer.tasks.latents import stats_path_for
from trainer.tasks.sampling import build_dit

from .released import import_summary, tokenizer_config_of, write_imported_run

log = logging.getLogger(__name__)

FORMAT = "rectok-hf-1"
WEIGHTS, CONFIG, CARD, STATS = "model.safetensors", "config.json", "README.md", "latent_stats.json"
WRITER = "`rectok export RUN --hf DIR`"
# The semantic decoder's output width is the teacher's feature width: the one constructor argument of a
# stage-1 tokenizer that its config does not hold (the teacher is not exported).
TEACHER_DIM_KEYS = ("semantic_decoder.out.bias", "semantic_decoder.mlp.3.bias")


# -- export --------------------------------------------------------------------------------------------------------

def final_metrics(run_dir: str, step: int) -> tuple[dict, str]:
    """The run's final evaluation at `step`: done.json's when the run finished there, else the last record of
    metrics.jsonl up to `step` with evaluation numbers; ({}, why) when there is none."""
    def numbers(record: dict) -> dict:  # not the paths of the evaluation's pictures
        return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    done = read_done(run_dir)
    if done and done.get("step") == step and done.get("metrics"):
        return numbers(done["metrics"]), f"{os.path.join(run_dir, 'done.json')} (the finished run, step {step})"
    for record in reversed(read_metrics(run_dir, missing_ok=True)):
        if record.get("step", 0) <= step and any(k.startswith("eval/") for k in record):
            return numbers(record), (f"the last evaluation in {os.path.join(run_dir, 'metrics.jsonl')} "
                                     f"(step {record['step']})")
    return {}, f"no evaluation recorded in {run_dir} up to step {step}"


def _number(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def model_card(info: dict, cfg: TrainConfig, metrics: dict, metrics_from: str, has_stats: bool, name: str) -> str:
    """README.md: YAML front matter (library_name, tags, a license placeholder), what the model is, how it was
    trained, its final metrics and how to load it; `name` is the folder's."""
    m = cfg.model
    grid = m.image_size // m.patch_size
    if cfg.task == "tokenizer":
        what = (f"A RecTok image tokenizer ({m.name}, stage {cfg.tokenizer.stage}): {m.image_size} px RGB images "
                f"<-> {grid}x{grid} latents of {m.latent_channels} channels (patch {m.patch_size}).")
        tags = ["image-tokenizer", "autoencoder"]
        use = ("from trainer.tasks.latents import FrozenTokenizer\n"
               f"tok = FrozenTokenizer(\"runs/hub/{name}\")  # .moments(images) -> (mean, logvar); .decode(z)")
        cli = f"rectok eval tokenizer runs/hub/{name}                 # rFID, PSNR"
    else:
        what = (f"A class-conditional DiT^DH generator ({m.name}, {cfg.dit.num_classes} classes) on the "
                f"{grid}x{grid}x{m.latent_channels} latents of a RecTok tokenizer ({m.image_size} px images). It "
                f"was trained on the latents of `{cfg.dit.tokenizer}`: import that tokenizer's folder with it.")
        tags = ["diffusion", "class-conditional-image-generation", "dit"]
        use = ("from trainer.tasks.sampling import load_dit\n"
               f"model, cfg = load_dit(\"runs/hub/{name}\")")
        cli = f"rectok sample runs/hub/{name} --out samples --num-images 16"
    rows = [f"| {k} | {_number(v)} |" for k, v in metrics.items() if k not in ("step", "epoch")]
    table = "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else "none recorded"
    data = cfg.data.train or "the bundled default dataset"
    tok_folder = " --hf TOKENIZER_FOLDER" if cfg.task == "dit" else ""
    files = [f"- `{WEIGHTS}`: the {info['weights'].upper()} weights ({info['tensors']} tensors, "
             f"{info['parameters']:,} parameters), step {info['step']}",
             f"- `{CONFIG}`: the resolved training config (`config`) and what the weights are (format `{FORMAT}`)"]
    if has_stats:
        files.append(f"- `{STATS}`: the per-channel latent statistics the DiT was trained with")
    lines = [
        "---",
        "library_name: rectok",
        "tags:", *(f"- {t}" for t in ["rectok", *tags, "safetensors"]),
        "license: other  # PLACEHOLDER: set the license of these weights (and of their training data) before "
        "publishing",
        "---",
        "",
        f"# {name}",
        "",
        what,
        "",
        "**License: not set.** The exporter does not know it: replace `license: other` in the front matter above.",
        "",
        "## Training",
        "",
        f"- recipe / run: `{cfg.run.name}` (task `{cfg.task}`, {cfg.schedule.epochs:g} epochs scheduled, "
        f"global batch {cfg.data.global_batch})",
        f"- data: {data}",
        f"- exported from: `{info['source']}`",
        "",
        "## Final metrics",
        "",
        f"From {metrics_from}:",
        "",
        table,
        "",
        "## Files",
        "",
        *files,
        "",
        "## Loading",
        "",
        "Into a run directory that `rectok sample`, `rectok eval` and training (`*.init_from`) read like their own:",
        "",
        "```bash",
        f"rectok import-official{tok_folder} --hf {name} --out runs/hub",
        cli,
        "```",
        "",
        "```python",
        use,
        "```",
        "",
        f"The weights alone: `safetensors.torch.load_file(\"{WEIGHTS}\")`.",
        "",
        "## Publishing",
        "",
        f"Written by {WRITER}, offline. `huggingface-cli upload USER/REPO {name}` publishes the folder.",
        "",
    ]
    return "\n".join(lines)


def export_hub(checkpoint: str, out_dir: str, use_ema: bool = True) -> dict:
    """`rectok export CHECKPOINT --hf DIR`: model.safetensors, config.json and README.md in DIR."""
    os.makedirs(out_dir, exist_ok=True)
    weights_path = os.path.join(out_dir, WEIGHTS)
    result = export_weights(checkpoint, weights_path, use_ema)
    with safe_open(weights_path, "pt") as f:  # what export_weights read from the checkpoint, loaded once
        meta = f.metadata()
    cfg = parse_saved_config(meta["config"])
    source = meta["source"]
    run_dir = os.path.dirname(os.path.dirname(source))  # RUN/checkpoints/step_N -> RUN
    metrics, metrics_from = final_metrics(run_dir, result["step"])
    info = {"format": FORMAT, "task": cfg.task, "model": cfg.model.name, "parameters": result["parameters"],
            "tensors": result["tensors"], "weights": result["weights"], "step": result["step"], "source": source,
            "run": cfg.run.name, "latent_channels": cfg.model.latent_channels, "image_size": cfg.model.image_size,
            "metrics": metrics}
    if cfg.task == "dit":
        info["num_classes"] = cfg.dit.num_classes
    has_stats = False
    if cfg.task == "dit":
        try:
            stats = stats_path_for(cfg)
        except FileNotFoundError:  # the tokenizer run is not on this machine
            stats = cfg.dit.stats
        if stats and os.path.isfile(stats):
            with open(stats, "rb") as f:
                write_bytes(os.path.join(out_dir, STATS), f.read())
            has_stats = True
    write_json(os.path.join(out_dir, CONFIG), {**info, "config": to_dict(cfg)})
    write_text(os.path.join(out_dir, CARD), model_card(info, cfg, metrics, metrics_from, has_stats,
                                                             os.path.basename(os.path.normpath(out_dir))))
    files = [WEIGHTS, CONFIG, CARD] + ([STATS] if has_stats else [])
    return {"out": out_dir, "files": files, **{k: v for k, v in info.items() if k != "metrics"},
            "metrics": metrics_from}


# -- import --------------------------------------------------------------------------------------------------------

def read_hub_info(folder: str) -> dict:
    """config.json of a folder written by `rectok export --hf`, checked: a missing file or another format is an
    error naming the file."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"hub folder not found: {folder}")
    for name in (CONFIG, WEIGHTS):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{os.path.join(folder, name)} is missing: {folder} is not a complete rectok "
                                    f"hub folder ({WRITER} writes {WEIGHTS}, {CONFIG} and {CARD})")
    path = os.path.join(folder, CONFIG)
    try:
        with open(path) as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    tag = info.get("format") if isinstance(info, dict) else None
    if tag != FORMAT:
        raise ConfigError(f"{path}: format {tag!r}, expected {FORMAT!r} (a folder written by {WRITER})")
    if not isinstance(info.get("config"), dict):
        raise ConfigError(f"{path}: no training config under 'config'")
    return info


def read_hub_folder(folder: str) -> tuple[dict, TrainConfig, dict]:
    """(config.json, its training config, the weights) of a folder written by `rectok export --hf`; a missing
    file, another format or an unreadable file is an error naming the file."""
    info = read_hub_info(folder)
    path = os.path.join(folder, CONFIG)
    try:
        cfg = from_dict(TrainConfig, info["config"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    path = os.path.join(folder, WEIGHTS)
    try:
        weights = load_file(path)  # safetensors: tensors only, no pickle
    except (SafetensorError, OSError, ValueError) as e:
        raise UnreadableWeightsError(f"{path}: cannot read as safetensors ({e}); the file may be truncated") from None
    return info, cfg, weights


def _model_for(cfg: TrainConfig, weights: dict):
    """The trained model `cfg` builds (tokenizer: with its semantic decoder while stage 1 trains one)."""
    m = cfg.model
    if cfg.task == "dit":
        return build_dit(cfg)
    semantic = {"semantic_decoder": "none"}
    if uses_teacher(cfg):
        dim = next((weights[k].shape[0] for k in TEACHER_DIM_KEYS if k in weights), 1024)
        semantic = {"semantic_decoder": m.semantic_decoder, "teacher_dim": dim}
    return build_model(m.name, latent_channels=m.latent_channels, image_size=m.image_size, patch_size=m.patch_size,
                       **semantic)


def _is_checkpoint(path: str | None) -> bool:
    try:
        return bool(path) and bool(resolve_checkpoint(path))
    except FileNotFoundError:
        return False


def _check_tokenizer(cfg: TrainConfig, folder: str) -> None:
    tok, m = tokenizer_config_of(cfg.dit.tokenizer).model, cfg.model
    have, want = (tok.latent_channels, tok.image_size // tok.patch_size), (m.latent_channels,
                                                                         m.image_size // m.patch_size)
    if have != want:
        raise ConfigError(f"dit.tokenizer: {cfg.dit.tokenizer} makes {have[1]}x{have[1]}x{have[0]} latents; "
                          f"{folder} works on {want[1]}x{want[1]}x{want[0]}")


def import_hub_folder(folder: str, out_dir: str, overrides: list[str] = (), force: bool = False,
                      tokenizer_run: str | None = None) -> dict:
    """One hub folder -> a run directory OUT/<folder name> with a verified checkpoint."""
    import torch

    info, saved, weights = read_hub_folder(folder)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(folder)))
    fixed = [f"run.output_dir={out_dir}", f"run.name={name}"]
    stats_file = os.path.join(folder, STATS)
    given = {o.split("=", 1)[0] for o in overrides}
    if saved.task == "dit":
        if tokenizer_run and "dit.tokenizer" not in given:
            fixed.append(f"dit.tokenizer={tokenizer_run}")
        elif "dit.tokenizer" not in given and not _is_checkpoint(saved.dit.tokenizer):
            raise ConfigError(f"{folder}: a DiT samples and trains through its tokenizer, {saved.dit.tokenizer!r} "
                              f"here: import its folder alongside (--hf TOKENIZER_FOLDER --hf {folder}) or name an "
                              f"imported one (dit.tokenizer=RUN)")
        if os.path.isfile(stats_file) and "dit.stats" not in given:
            fixed.append(f"dit.stats={os.path.join(out_dir, name, STATS)}")
        elif "dit.stats" not in given:
            fixed.append("dit.stats=null")  # computed beside the tokenizer on first use
    cfg = with_overrides(saved, fixed + list(overrides))
    if cfg.task == "dit":
        _check_tokenizer(cfg, folder)
    with torch.device("meta"):
        model = _model_for(cfg, weights)
    converted = Converted(weights, {"name": cfg.model.name}, official_name=str)
    try:
        check_layout(model, converted)
    except OfficialLayoutError as e:
        raise OfficialLayoutError(f"{os.path.join(folder, WEIGHTS)}: {e}") from None
    source = (f"{info.get('weights', '?')} weights of {info.get('source', '?')} (used as both the raw and the EMA "
              "weights)")
    meta = {"imported_from": os.path.abspath(folder), "weights": source}
    run_dir = write_imported_run(cfg, converted, converted, meta, force)
    if cfg.task == "dit" and os.path.isfile(stats_file) and "dit.stats" not in given:
        with open(stats_file, "rb") as f:
            write_bytes(cfg.dit.stats, f.read())
    return {**import_summary(run_dir, folder, cfg.model.name, source, converted), "task": cfg.task}


def import_hub(folders: list[str], out_dir: str, overrides: list[str] = (), force: bool = False) -> dict:
    """`rectok import-official --hf DIR [--hf DIR ...]`: tokenizer folders first; a DiT folder is linked to the
    one tokenizer imported with it (or dit.tokenizer=RUN among the overrides, or its own when that run exists)."""
    read = [(folder, read_hub_info(folder).get("task")) for folder in folders]
    out, tokenizers = {}, []
    for folder, task in sorted(read, key=lambda r: r[1] != "tokenizer"):
        key = folder if folder not in out else f"{folder} ({len(out)})"
        if task == "dit" and len(tokenizers) > 1:
            raise ConfigError(f"{folder}: several tokenizer folders were given; name the DiT's with "
                              f"dit.tokenizer=RUN or import the DiT on its own")
        out[key] = import_hub_folder(folder, out_dir, overrides, force, tokenizers[0] if tokenizers else None)
        if out[key]["task"] == "tokenizer":
            tokenizers.append(out[key]["run"])
        log.info("imported %s %s -> %s", out[key]["task"], folder, out[key]["run"])
    return out
