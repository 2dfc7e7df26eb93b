"""Reading frozen-network weights from local files (nothing is downloaded)."""
from __future__ import annotations

import os

import torch

RANDOM = "random"  # explicit opt-in to random initialisation, for tests and the CPU demo


class MissingWeightsError(FileNotFoundError):
    pass


def load_state_dict_file(path: str, what: str) -> dict[str, torch.Tensor]:
    """Load a .safetensors / .pt / .pth state dict; unwrap {'model': ...} / {'state_dict': ...}."""
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"{what}: weights file not found: {path!r}. This machine cannot download weights; "
            f"give a local file (or '{RANDOM}' for a randomly initialised network in tests).")
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
    """The configured weights value, or a clear error naming the config key when it is unset."""
    if not weights:
        raise MissingWeightsError(
            f"{what}: no weights given; set {key} to a local file (or '{RANDOM}' for tests)")
    return weights
