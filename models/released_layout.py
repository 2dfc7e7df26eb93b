"""The released RecTok and DiT^DH checkpoints' key layout (docs/reference.md §7) and ours, both ways.

Our modules were named after the released ones, so most tensors keep their names. What differs:
- tokenizer: `encoder.patch_embed.0` and `decoder.ffn.1` are convs inside nn.Sequential wrappers (with
  einops rearranges) there, plain convs here; `decoder.mask_token` and the semantic decoder's
  `mask_embedding` are [1, 1, D] there, [D] here; the semantic decoder sits under
  `sem_decoders.<teacher>` (older files: `aux_decoders`), the frozen teacher under
  `sem_foundation_models.<teacher>` (`aux_foundation_models`): dropped, a teacher loads from its own file.
- DiT^DH: the same names, plus the RoPE tables `{enc,dec}_feat_rope.freqs_{cos,sin}`, which we recompute:
  on import they are checked against ours and not kept; on export they are written again.
No tensor needs permuting, because our modules compute in the released orders: fused qkv as
(qkv, head, head_dim), SwiGLU w12 = [gate | value], latent head = [mean | logvar], pixel shuffle channels
(p1, p2, c). tests/test_official.py checks each against a hand-written reference of the released maths.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import VIT_SIZES
from .dit import eva_rope_table
from .registry import DIT_SIZES, build_model, rectok_name

TEACHER_PREFIXES = ("sem_foundation_models.", "aux_foundation_models.")
SEMANTIC_PREFIXES = ("sem_decoders.", "aux_decoders.")
SEQUENTIAL_RENAMES = (("encoder.patch_embed.0.", "encoder.patch_embed."), ("decoder.ffn.1.", "decoder.ffn."))
TOKEN_VECTORS = ("decoder.mask_token", "semantic_decoder.mask_embedding")
SEMANTIC = "semantic_decoder."
# Teacher names in the released files -> our teacher registry (models/teachers.py).
OFFICIAL_TEACHERS = {"dinov3": "dinov3-l16", "dinov2": "dinov2-l14", "siglip": "siglip2-l16"}
DIT_ROPE_TABLES = ("enc_feat_rope", "dec_feat_rope")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers around a saved model
ROPE_ATOL = 1e-4  # the released tables were computed in fp32, ours in fp64
SHOWN = 12  # keys listed per kind of mismatch


class OfficialLayoutError(ValueError):
    """A checkpoint that does not fit the released layout; the message names the keys."""


@dataclass
class Converted:
    state: dict[str, torch.Tensor]  # our names and shapes
    arch: dict  # registry name and constructor arguments of the model the tensors belong to
    official_name: Callable[[str], str]  # our key -> the file's, for messages and export
    notes: list[str] = field(default_factory=list)
    teacher_key: str | None = None  # tokenizer: the file's teacher name, when it holds a semantic decoder

    def build(self) -> nn.Module:
        """The model these tensors fit (under `torch.device("meta")`: shapes only, no memory)."""
        return build_model(self.arch["name"], **{k: v for k, v in self.arch.items() if k != "name"})


def weight_sets(obj) -> tuple[dict, dict, str]:
    """A loaded checkpoint -> (raw, EMA) state dicts and which entries they came from.

    A bare state dict, or a dict with `model` and / or `model_ema` (EMA preferred for generation)."""
    if not isinstance(obj, dict):
        raise OfficialLayoutError(f"expected a state dict or a dict with 'model' / 'model_ema', "
                                  f"got {type(obj).__name__}")
    raw, ema = obj.get("model"), obj.get("model_ema")
    if isinstance(raw, dict) and isinstance(ema, dict):
        return raw, ema, "model (raw) and model_ema (EMA)"
    if isinstance(ema, dict) or isinstance(raw, dict):
        one, name = (ema, "model_ema") if isinstance(ema, dict) else (raw, "model")
        return one, one, f"{name} only (used as both the raw and the EMA weights)"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, obj, "a bare state dict (used as both the raw and the EMA weights)"
    raise OfficialLayoutError(f"neither a state dict nor a dict with 'model' / 'model_ema' (top-level keys: "
                              f"{sorted(map(str, obj))[:SHOWN]})")


def _unwrap(sd: dict) -> dict:
    for p in WRAPPER_PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def _need(c: Converted, key: str) -> torch.Tensor:
    if key not in c.state:
        raise OfficialLayoutError(f"missing key {c.official_name(key)}")
    return c.state[key]


def _depth(state: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}{n}.norm1.weight" in state:
        n += 1
    return n


def _grid(c: Converted, key: str) -> int:
    n = _need(c, key).shape[-2]
    g = math.isqrt(n)
    if g * g != n:
        raise OfficialLayoutError(f"{c.official_name(key)}: {n} positions is not a square grid")
    return g


def check_layout(model: nn.Module, c: Converted) -> None:
    """Every tensor accounted for: the converted state has exactly the model's keys and shapes (meta too)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    name = c.official_name
    missing = sorted(name(k) for k in expected.keys() - c.state.keys())
    unexpected = sorted(name(k) for k in c.state.keys() - expected.keys())
    wrong = sorted(f"{name(k)}: {tuple(c.state[k].shape)} in the file, {tuple(expected[k])} expected"
                   for k in expected.keys() & c.state.keys() if c.state[k].shape != expected[k])
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
            problems.append(f"{len(keys)} {what}: " + "; ".join(keys[:SHOWN]) + more)
    if problems:
        raise OfficialLayoutError(f"does not fit {c.arch['name']}: " + " | ".join(problems))


def _dtype_note(state: dict) -> list[str]:
    kinds = sorted({str(v.dtype).replace("torch.", "") for v in state.values()} - {"float32"})
    return [f"tensors stored as {', '.join(kinds)}; loaded into float32 parameters"] if kinds else []


# -- tokenizer -----------------------------------------------------------------------------------------

def _our_tokenizer_key(key: str) -> str:
    for p in SEMANTIC_PREFIXES:
        if key.startswith(p):
            return SEMANTIC + key[len(p):].partition(".")[2]
    for official, ours in SEQUENTIAL_RENAMES:
        if key.startswith(official):
            return ours + key[len(official):]
    return key


def official_tokenizer_key(key: str, teacher_key: str | None = "dinov3") -> str:
    if key.startswith(SEMANTIC):
        return f"{SEMANTIC_PREFIXES[0]}{teacher_key}.{key[len(SEMANTIC):]}"
    for official, ours in SEQUENTIAL_RENAMES:
        if key.startswith(ours):
            return official + key[len(ours):]
    return key


def _vit_size(what: str, width: int, depth: int) -> str:
    for name, s in VIT_SIZES.items():
        if (s.width, s.depth) == (width, depth):
            return name
    sizes = ", ".join(f"{n} {s.depth}x{s.width}" for n, s in VIT_SIZES.items())
    raise OfficialLayoutError(f"{what}: {depth} blocks of width {width} is none of the ViT sizes ({sizes})")


def tokenizer_from_official(sd: dict) -> Converted:
    """A released RecTok state dict (generation module, stage 1 with its semantic decoder and teacher, or
    `aux_` names) -> our names and shapes, the architecture it implies, and what was dropped."""
    sd, state, teachers, dropped = _unwrap(sd), {}, set(), 0
    semantic = {k.split(".")[1] for k in sd if k.startswith(SEMANTIC_PREFIXES)}
    if len(semantic) > 1:
        raise OfficialLayoutError(f"semantic decoders for {sorted(semantic)}: our tokenizer holds one")
    teacher_key = next(iter(semantic), None)
    for key, value in sd.items():
        if key.startswith(TEACHER_PREFIXES):
            teachers.add(key.split(".")[1])
            dropped += 1
            continue
        ours = _our_tokenizer_key(key)
        if ours in TOKEN_VECTORS and value.dim() == 3 and tuple(value.shape[:2]) == (1, 1):
            value = value.reshape(-1)
        if ours in state:
            raise OfficialLayoutError(f"{key} is in the file twice (under sem_ and aux_ names)")
        state[ours] = value
    c = Converted(state, {}, lambda k: official_tokenizer_key(k, teacher_key), teacher_key=teacher_key)
    pe = _need(c, "encoder.patch_embed.weight")  # [width, 3, p, p]
    latent = _need(c, "encoder.latent_head.weight").shape[0]
    if latent % 2:
        raise OfficialLayoutError(f"encoder.latent_head.weight: {latent} rows, expected 2C ([mean | logvar])")
    grid, patch = _grid(c, "encoder.positional_embedding"), pe.shape[-1]
    c.arch = {"name": rectok_name(_vit_size("encoder", pe.shape[0], _depth(state, "encoder.transformer.")),
                                  _vit_size("decoder", _need(c, "decoder.positional_embedding").shape[-1],
                                            _depth(state, "decoder.transformer."))),
              "latent_channels": latent // 2, "image_size": grid * patch, "patch_size": patch,
              "semantic_decoder": "none"}
    if teacher_key is not None:
        width, depth, tiny = (_need(c, SEMANTIC + "token_embedding.weight").shape[0],
                              _depth(state, SEMANTIC + "transformer."), VIT_SIZES["tiny"])
        if (width, depth) != (tiny.width, tiny.depth):
            raise OfficialLayoutError(f"{SEMANTIC_PREFIXES[0]}{teacher_key}: {depth} blocks of width {width}; only "
                                      f"the released tiny transformer ({tiny.depth}x{tiny.width}) is supported")
        c.arch.update(semantic_decoder="transformer", teacher_dim=_need(c, SEMANTIC + "out.weight").shape[0])
        c.notes.append(f"semantic decoder for the {teacher_key} teacher kept (stage-1 file)")
    if dropped:
        c.notes.append(f"frozen teacher weights dropped: {dropped} tensors of {', '.join(sorted(teachers))} "
                       f"(a teacher is loaded from its own file, teacher.weights)")
    c.notes += _dtype_note(state)
    return c


def tokenizer_to_official(state: dict, teacher_key: str | None = "dinov3") -> dict:
    """Our tokenizer state dict -> the released layout (the semantic decoder under sem_decoders.<teacher>)."""
    return {official_tokenizer_key(k, teacher_key): v.reshape(1, 1, -1) if k in TOKEN_VECTORS else v
            for k, v in state.items()}


def official_teacher_key(teacher_name: str) -> str:
    """Our teacher name -> the released files' key (dinov3-l16 -> dinov3)."""
    return {v: k for k, v in OFFICIAL_TEACHERS.items()}.get(teacher_name, teacher_name.split("-")[0])


# -- DiT^DH ------------------------------------------------------------------------------------------

def _dit_size(size: str) -> str:
    key = size.upper().removeprefix("DITDH-")
    if key not in DIT_SIZES:
        raise OfficialLayoutError(f"unknown DiT^DH size {size!r}; known: {', '.join(DIT_SIZES)}")
    return key


def _rope_head_dims(size: str) -> dict[str, int]:
    trunk, head = DIT_SIZES[size]
    return {"enc_feat_rope": trunk[0] // trunk[2], "dec_feat_rope": head[0] // head[2]}


def dit_rope_tables(size: str, grid: int) -> dict[str, torch.Tensor]:
    """The released files' RoPE buffers, from the tables our model computes."""
    out = {}
    for name, hd in _rope_head_dims(size).items():
        table = eva_rope_table(hd, grid)
        out[f"{name}.freqs_cos"], out[f"{name}.freqs_sin"] = table[:, :hd].contiguous(), table[:, hd:].contiguous()
    return out


def dit_from_official(sd: dict, size: str | None = None) -> Converted:
    """A released DiT^DH state dict -> our state dict and architecture. The size is read from the tensors;
    `size` ("XL" or "DiTDH-XL"), when given, must agree. RoPE tables are checked, then left out."""
    sd = _unwrap(sd)
    tables = {k: v for k, v in sd.items() if k.split(".")[0] in DIT_ROPE_TABLES}
    c = Converted({k: v for k, v in sd.items() if k not in tables}, {}, lambda k: k)
    trunk_w, grid = _need(c, "pos_embed").shape[-1], _grid(c, "pos_embed")
    widths = [c.state[f"blocks.{i}.norm1.weight"].shape[0] for i in range(_depth(c.state, "blocks."))]
    trunk_d = next((i for i, w in enumerate(widths) if w != trunk_w), len(widths))
    head_w, head_d = (widths[-1] if widths else 0), len(widths) - trunk_d
    found = [n for n, (t, h) in DIT_SIZES.items() if (t[0], t[1], h[0], h[1]) == (trunk_w, trunk_d, head_w, head_d)]
    shape = f"trunk {trunk_d}x{trunk_w}, head {head_d}x{head_w}"
    if not found:
        sizes = ", ".join(f"{n} {t[1]}x{t[0]}+{h[1]}x{h[0]}" for n, (t, h) in DIT_SIZES.items())
        raise OfficialLayoutError(f"{shape} is none of the DiT^DH sizes ({sizes})")
    if size is not None and _dit_size(size) != found[0]:
        raise OfficialLayoutError(f"--size {size}, but the file holds DiTDH-{found[0]} ({shape})")
    c.arch = {"name": f"DiTDH-{found[0]}", "latent_channels": _need(c, "x_embedder.proj.weight").shape[1],
              "grid": grid, "num_classes": _need(c, "y_embedder.embedding_table.weight").shape[0] - 1}
    expected = dit_rope_tables(found[0], grid)
    for key, t in tables.items():
        ref = expected.get(key)
        if ref is None or t.shape != ref.shape:
            want = f"{tuple(ref.shape)} expected" if ref is not None else "not a RoPE table of this model"
            raise OfficialLayoutError(f"{key}: {tuple(t.shape)} in the file, {want}")
        if t.device.type != "meta" and not torch.allclose(t.float(), ref, atol=ROPE_ATOL):
            raise OfficialLayoutError(f"{key}: differs from the EVA RoPE table (theta 10000, integer positions) this "
                                      f"model computes by {(t.float() - ref).abs().max():.3g}: another RoPE variant")
    c.notes.append(f"RoPE tables: {len(tables)} of 4 in the file, checked against the recomputed ones and not stored"
                   if tables else "RoPE tables not in the file (recomputed, as always)")
    c.notes += _dtype_note(c.state)
    return c


def dit_to_official(state: dict, name: str) -> dict:
    """Our DiT^DH state dict -> the released layout, RoPE tables included."""
    grid = math.isqrt(state["pos_embed"].shape[-2])
    return {**state, **dit_rope_tables(_dit_size(name), grid)}
