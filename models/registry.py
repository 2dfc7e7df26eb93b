"""Name -> constructor registry (as the DiT repo's DiT_models): `build_model("RecTok-BB", latent_channels=C)`."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .dit import DiTDH
from .rectok import RecTok

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
        return RecTok(encoder_size=encoder_size, decoder_size=decoder_size, **kwargs)
    return build


# Letters: encoder size then pixel-decoder size (T tiny, S small, B base, L large). BB is the paper's.
_SIZES = {"T": "tiny", "S": "small", "B": "base", "L": "large"}
for _e in _SIZES:
    for _d in _SIZES:
        register(f"RecTok-{_e}{_d}")(_rectok(_SIZES[_e], _SIZES[_d]))


def rectok_name(encoder_size: str, decoder_size: str) -> str:
    """("base", "base") -> "RecTok-BB"."""
    letter = {v: k for k, v in _SIZES.items()}
    return f"RecTok-{letter[encoder_size]}{letter[decoder_size]}"


# docs/reference.md §2.1: (trunk width, depth, heads) and (head width, depth, heads). DiTDH-T is NOT from the paper:
# a tiny size for CPU tests and the demo.
DIT_SIZES = {
    "T": ((128, 2, 4), (192, 2, 4)),
    "S": ((384, 12, 6), (2048, 2, 16)),
    "B": ((768, 12, 12), (2048, 2, 16)),
    "L": ((1024, 24, 16), (2048, 2, 16)),
    "XL": ((1152, 28, 16), (2048, 2, 16)),
}


def _dit(trunk: tuple[int, int, int], head: tuple[int, int, int]):
    def build(latent_channels: int = 128, grid: int = 16, num_classes: int = 1000, label_init_std: float = 0.02):
        return DiTDH(*trunk, latent_channels=latent_channels, grid=grid, num_classes=num_classes,
                     head_width=head[0], head_depth=head[1], head_heads=head[2], label_init_std=label_init_std)
    return build


for _name, (_trunk, _head) in DIT_SIZES.items():
    register(f"DiTDH-{_name}")(_dit(_trunk, _head))
