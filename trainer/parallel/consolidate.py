"""Whole weights of any checkpoint in one process, whatever strategy and world size wrote it: what
sampling, evaluation, export, stage-2 initialisation and the frozen tokenizer of DiT training read."""
from __future__ import annotations

from safetensors.torch import save_file

from data.files import atomic_output
from trainer.engine.checkpoint import read_meta, resolve_checkpoint, verified_checkpoint

from .deepspeed_strategy import load_deepspeed_weights
from .torch_strategy import load_dcp_weights


def load_state(path: str) -> dict:
    """{"step", "config", ..., "modules": {trained module: state dict}, "ema": state dict} of a run or
    checkpoint directory, read by this process alone after its files were checked against their checksums
    (of a run directory: its newest checkpoint that verifies)."""
    directory = verified_checkpoint(path)
    meta = read_meta(directory)
    if meta["format"] == "deepspeed":
        return {**meta, **load_deepspeed_weights(directory)}
    return {**meta, **load_dcp_weights(directory, {"modules", "ema"})}


def model_weights(state: dict, use_ema: bool) -> dict:
    """The trained model's weights in a loaded checkpoint state: its EMA, or the raw ones."""
    return state["ema"] if use_ema else state["modules"]["generator"]


def export_weights(path: str, out: str, use_ema: bool = True) -> dict:
    """One safetensors file of a checkpoint's whole model (EMA by default), with its config as metadata."""
    state = load_state(path)
    weights = {k: v.contiguous() for k, v in model_weights(state, use_ema).items()}
    with atomic_output(out) as tmp:
        save_file(weights, tmp, metadata={"config": state["config"], "step": str(state["step"]),
                                          "weights": "ema" if use_ema else "raw", "source": resolve_checkpoint(path)})
    return {"out": out, "step": state["step"], "weights": "ema" if use_ema else "raw", "tensors": len(weights),
            "parameters": sum(v.numel() for v in weights.values())}
