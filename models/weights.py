"""Reading weights from local files (nothing is downloaded), with errors that name the file."""
from __future__ import annotations

import argparse
import os
import pickle
import re

import torch

RANDOM = "random"  # explicit opt-in to random initialisation, for tests and the CPU demo

# Research checkpoints often pickle their argparse namespace next to the weights; it holds no code.
SAFE_GLOBALS = [argparse.Namespace]


class MissingWeightsError(FileNotFoundError):
    pass


class UnreadableWeightsError(ValueError):
    pass


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"{what}: weights file not found: {path!r}. This machine cannot download weights; "
            f"give a local file (or '{RANDOM}' for a randomly initialised network in tests).")


def read_checkpoint(path: str, what: str, trust_pickle: bool = False):
    """The object stored in a .safetensors / .pt / .pth file, read on the CPU.

    Pickles load with weights_only (tensors, containers, argparse namespaces): a file that needs any
    other Python object fails with its name unless `trust_pickle` (the file can then run code).
    """
    _check_file(path, what)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as e:
            raise UnreadableWeightsError(f"{what}: cannot read {path} ({e}); the file may be truncated") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:
                # Mapped, not read: a 3.3 GB DiT file is then not held twice while it is converted.
                return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=not trust_pickle)  # legacy format
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e):
            raise UnreadableWeightsError(f"{what}: cannot read {path} ({e}); the file may be truncated "
                                         f"or not a PyTorch checkpoint") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise UnreadableWeightsError(
            f"{what}: {path} stores Python objects besides tensors ({found.group(1) if found else 'unknown'}); if "
            f"you trust the file, load it anyway with --trust-pickle (unpickling can run code)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise UnreadableWeightsError(f"{what}: cannot read {path} ({type(e).__name__}: {str(e)[:200]}); the file "
                                     f"may be truncated or not a PyTorch checkpoint") from None


def load_state_dict_file(path: str, what: str) -> dict[str, torch.Tensor]:
    """Load a .safetensors / .pt / .pth state dict; unwrap {'model': ...} / {'state_dict': ...}."""
    sd = read_checkpoint(path, what)
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
