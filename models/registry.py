"""Name -> constructor registry (as the DiT repo's DiT_models): `build_model("RecTok-BB", latent_channels=C)`."""
from __future__ import annotations

from typing import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = fn
        return fn
    return wrap


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def _rectok(encoder_size: str, decoder_size: str):
    def build(**kwargs):
        from .rectok import RecTok
        return RecTok(encoder_size=encoder_size, decoder_size=decoder_size, **kwargs)
    return build


# Letters: encoder size then pixel-decoder size (T tiny, S small, B base, L large). BB is the paper's.
_SIZES = {"T": "tiny", "S": "small", "B": "base", "L": "large"}
for _e in _SIZES:
    for _d in _SIZES:
        register(f"RecTok-{_e}{_d}")(_rectok(_SIZES[_e], _SIZES[_d]))
