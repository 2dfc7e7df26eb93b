"""Reading weights from local files (nothing is downloaded), with errors that name the file.

No file a user hands over or finds in a run directory may run code when it is read: pickles are
unpickled with an allow-list (torch's weights_only unpickler, or `restricted_unpickle` for plain
pickles), also inside libraries that call torch.load(weights_only=False) themselves
(`weights_only_loading`). Only `rectok import-official --trust-pickle` opts out, for one file.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from collections.abc import Collection, Sequence
from typing import IO

import torch

from .weight_manifest import entry_for_file, fetch_command, fetch_hint, verify

RANDOM = "random"  # explicit opt-in to random initialisation, for tests and the CPU demo

# Research checkpoints often pickle their argparse namespace next to the weights; it holds no code.
SAFE_GLOBALS = [argparse.Namespace]

# torch.load reads these at every call; forcing weights_only this way reaches calls inside libraries.
FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class MissingWeightsError(FileNotFoundError):
    pass


class UnreadableWeightsError(ValueError):
    pass


class WrongWeightsError(UnreadableWeightsError):
    """A file the manifest (configs/weights.yaml) lists, of the wrong size or checksum."""


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        hint = fetch_hint(path)
        if hint:
            raise MissingWeightsError(f"{what}: weights file not found: {path!r}.{hint} (Or point $RECTOK_WEIGHTS "
                                      f"or run.weights_dir at the directory that holds it.)")
        raise MissingWeightsError(
            f"{what}: weights file not found: {path!r}. Nothing is downloaded at start-up; give a local file "
            f"(or '{RANDOM}' for a randomly initialised network in tests).")


def _check_listed_file(path: str, what: str) -> None:
    """A file the manifest lists (by its file name) must be the listed one: size and SHA-256 (or the hash
    prefix the manifest knows) are checked, once per process and file version."""
    entry = entry_for_file(path)
    if entry is None:
        return
    verdict = verify(path, entry)
    if not verdict.passing:
        raise WrongWeightsError(
            f"{what}: {path} is not the file configs/weights.yaml lists as {entry.name} ({verdict.status}: "
            f"{verdict.detail}); a truncated or corrupted download? Fetch it again: "
            f"`{fetch_command(entry, os.path.dirname(path) or '.')}` (a file of your own: give it another name)")


def refused(what: str, path: str, found: str) -> UnreadableWeightsError:
    """The one message for a file that would need a Python object outside the allow-list."""
    return UnreadableWeightsError(
        f"{what}: {path} stores Python objects besides tensors ({found}); refused, as unpickling them can run "
        f"code (only `rectok import-official --trust-pickle` loads such files, for a released checkpoint you trust)")


def _is_refusal(e: pickle.UnpicklingError) -> bool:
    return "Weights only load failed" in str(e) or "WeightsUnpickler error" in str(e)


def _refused_global(e: pickle.UnpicklingError) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e)) or re.search(r"WeightsUnpickler error: ([^\n]+)",
                                                                                 str(e))
    return found.group(1) if found else "unknown"


def _file_being_loaded(tb) -> str | None:
    """The path the innermost torch.load of a traceback was reading (None for a stream): libraries
    such as DeepSpeed do not say which of their files failed."""
    path = None
    while tb is not None:
        if tb.tb_frame.f_code is torch.serialization.load.__code__:
            f = tb.tb_frame.f_locals.get("f")
            path = os.fspath(f) if isinstance(f, (str, os.PathLike)) else None
        tb = tb.tb_next
    return path


def as_refusal(e: BaseException, what: str, path: str | None = None) -> UnreadableWeightsError | None:
    """`e` as our refusal when it is torch's weights_only refusal (None for any other error), naming the
    file torch.load was reading, else `path`."""
    if isinstance(e, UnreadableWeightsError):
        return e
    if not (isinstance(e, pickle.UnpicklingError) and _is_refusal(e)):
        return None
    return refused(what, _file_being_loaded(e.__traceback__) or path or "a file", _refused_global(e))


@contextlib.contextmanager
def weights_only_loading(what: str, allowed_globals: Sequence = (), path: str | None = None):
    """Every torch.load inside reads with weights_only, whatever its caller passes (DeepSpeed and DCP
    pass weights_only=False): tensors, containers and `allowed_globals` only. A refusal raises
    UnreadableWeightsError naming the file torch.load was reading (else `path`) and the global. Like
    torch's safe_globals, it holds for the whole process while it lasts."""
    saved = {k: os.environ.get(k) for k in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(FORCE_NO_WEIGHTS_ONLY, None)  # both set is an error in torch.load; ours wins here
    # Only the new ones: leaving the context must not withdraw globals an enclosing one allowed.
    new = [g for g in allowed_globals if g not in torch.serialization.get_safe_globals()]
    try:
        with torch.serialization.safe_globals(new):
            yield
    except pickle.UnpicklingError as e:
        refusal = as_refusal(e, what, path)
        if refusal is None:
            raise
        raise refusal from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Refused(pickle.UnpicklingError):
    pass


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], allowed: Collection[str]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        # Every callable a pickle can reach comes through here (GLOBAL, STACK_GLOBAL and the extension codes).
        if f"{module}.{name}" not in self.allowed:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {str(pid)[:50]}")


def restricted_unpickle(file: IO[bytes], allowed: Collection[str], what: str, path: str):
    """The object in a plain pickle (not torch.save's zip format) that may use only the `allowed`
    globals ("module.name") besides what pickle writes with its own opcodes (dict, list, tuple, set,
    str, bytes, numbers, None); any other fails, before it is called, with UnreadableWeightsError
    naming `path` and the global."""
    try:
        return _AllowListUnpickler(file, allowed).load()
    except _Refused as e:
        raise refused(what, path, str(e)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise UnreadableWeightsError(f"{what}: cannot read {path} ({type(e).__name__}: {str(e)[:200]}); the file "
                                     f"may be truncated") from None


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
        if not _is_refusal(e):
            raise UnreadableWeightsError(f"{what}: cannot read {path} ({e}); the file may be truncated "
                                         f"or not a PyTorch checkpoint") from None
        raise refused(what, path, _refused_global(e)) from None
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
    """The configured weights value; a clear error naming the config key when it is unset or missing, and,
    for a file configs/weights.yaml lists, when its size or checksum is wrong (with the fetch command)."""
    if not weights:
        raise MissingWeightsError(
            f"{what}: no weights given; set {key} to a local file (or '{RANDOM}' for tests)")
    if weights != RANDOM:
        _check_file(weights, f"{what} ({key})")
        _check_listed_file(weights, f"{what} ({key})")
    return weights
