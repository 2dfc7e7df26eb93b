"""Reading frozen-network weights from local files (nothing is downloaded)."""
from __future__ import annotations

import os

import torch

RANDOM = "random"  # explicit opt-in to random initialisation, for tests and the CPU demo


class MissingWeightsError(FileNotFoundError):
    pass


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"{what}: weights file not found: {path!r}. This machine cannot download weights; "
            f"give a local file (or '{RANDOM}' for a randomly initialised network in tests).")


def load_state_dict_file(path: str, what: str) -> dict[str, torch.Tensor]:
    """Load a .safetensors / .pt / .pth state dict; unwrap {'model': ...} / {'state_dict': ...}."""
    _check_file(path, what)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def require_weights(weights: str | None, what: str, key: str) -> str:
    """The configured weights value; a clear error naming the config key when it is unset or missing."""
    if not weights:
        raise MissingWeightsError(
            f"{what}: no weights given; set {key} to a local file (or '{RANDOM}' for tests)")
    if weights != RANDOM:
        _check_file(weights, f"{what} ({key})")
    return weights
