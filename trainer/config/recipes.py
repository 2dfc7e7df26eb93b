"""Where configs come from: a YAML recipe plus dotted overrides, resolved once into the typed tree
(trainer/config/schema.py), validated, and written back as YAML with every run and checkpoint."""
from __future__ import annotations

import os

import yaml

from models.weight_manifest import in_weights_dir, weights_dir

from .catalog import CONFIG_DIR, bundled_recipes
from .schema import TrainConfig
from .tree import ConfigError, apply_overrides, field_docs, from_dict, read_yaml, to_dict
from .validation import validate

# The keys that name weight files: a value `weights/FILE` means FILE in the weights directory.
WEIGHT_KEYS = ("teacher.weights", "loss.lpips_vgg_weights", "loss.convnext_weights", "eval.inception_weights",
               "eval.reference")


def find_recipe(path: str) -> str:
    """A file path, or a bundled recipe name such as `rectok/tiny_stage1`."""
    if os.path.isfile(path):
        return path
    for cand in (os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, path + ".yaml")):
        if os.path.isfile(cand):
            return cand
    raise ConfigError(f"config file not found: {path} (nor under {CONFIG_DIR}); the bundled recipes are "
                      f"{', '.join(bundled_recipes())} (`rectok recipes` says what each is)")


def load_config(path: str | None, overrides: list[str] = (), world_size: int = 1) -> TrainConfig:
    """YAML recipe + dotted overrides -> validated TrainConfig (the one place recipes are resolved)."""
    data = read_yaml(find_recipe(path)) if path else {}
    cfg = resolve_weight_paths(from_dict(TrainConfig, apply_overrides(data, list(overrides))))
    validate(cfg, world_size)
    return cfg


def with_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A resolved config (a checkpoint's saved one) with dotted overrides applied, validated again."""
    out = resolve_weight_paths(from_dict(TrainConfig, apply_overrides(to_dict(cfg), list(overrides))))
    validate(out)
    return out


def resolve_weight_paths(cfg: TrainConfig) -> TrainConfig:
    """Weight paths `weights/FILE` (WEIGHT_KEYS) moved into the weights directory: run.weights_dir, else
    $RECTOK_WEIGHTS, else ./weights (then they stay as written). Absolute paths, other relative paths and
    'random' are kept; a path already resolved is kept too (the directory is absolute when configured)."""
    directory = weights_dir(cfg.run.weights_dir)
    for key in WEIGHT_KEYS:
        section, name = key.split(".")
        part = getattr(cfg, section)
        setattr(part, name, in_weights_dir(getattr(part, name), directory))
    return cfg


def parse_saved_config(text: str) -> TrainConfig:
    """The resolved config stored inside a checkpoint (no validation: it was validated when saved)."""
    return from_dict(TrainConfig, yaml.safe_load(text))


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_docs() -> str:
    return "\n".join(f"{k} ({tp}, default {default!r}): {doc}" for k, tp, default, doc in field_docs(TrainConfig))
