"""Where configs come from: a YAML recipe plus dotted overrides, resolved once into the typed tree
(trainer/config/schema.py), validated, and written back as YAML with every run and checkpoint."""
from __future__ import annotations

import os

import yaml

from .catalog import CONFIG_DIR, bundled_recipes
from .schema import TrainConfig
from .tree import ConfigError, apply_overrides, field_docs, from_dict, read_yaml, to_dict
from .validation import validate


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
    cfg = from_dict(TrainConfig, apply_overrides(data, list(overrides)))
    validate(cfg, world_size)
    return cfg


def with_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A resolved config (a checkpoint's saved one) with dotted overrides applied, validated again."""
    out = from_dict(TrainConfig, apply_overrides(to_dict(cfg), list(overrides)))
    validate(out)
    return out


def parse_saved_config(text: str) -> TrainConfig:
    """The resolved config stored inside a checkpoint (no validation: it was validated when saved)."""
    return from_dict(TrainConfig, yaml.safe_load(text))


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_docs() -> str:
    return "\n".join(f"{k} ({tp}, default {default!r}): {doc}" for k, tp, default, doc in field_docs(TrainConfig))
