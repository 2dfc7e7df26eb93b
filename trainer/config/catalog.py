"""The bundled recipes under configs/: their names and one line each, read with the standard library
only, so `rectok train --help` and `rectok recipes` list them without importing torch."""
from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
KINDS = {"rectok": "tokenizer recipes (rectok train / submit)", "dit": "DiT^DH recipes (rectok train / submit)",
         "sweeps": "sweeps (rectok sweep)"}
TRAINING = ("rectok", "dit")


def _summary(path: str, width: int = 96) -> str:
    """The recipe's leading comment up to its first full stop, shortened to `width` characters."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line[1:].strip())
    text = " ".join(lines)
    stop = text.find(". ")
    text = text[:stop + 1] if stop >= 0 else text
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def bundled_recipes(kinds: tuple[str, ...] = tuple(KINDS)) -> dict[str, str]:
    """`kind/name` (as the commands take it) -> one line describing the recipe, in name order."""
    out = {}
    for kind in kinds:
        folder = os.path.join(CONFIG_DIR, kind)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(".yaml"):
                out[f"{kind}/{name[:-len('.yaml')]}"] = _summary(os.path.join(folder, name))
    return out


def recipe_listing(kinds: tuple[str, ...] = tuple(KINDS)) -> str:
    """The recipes of `kinds`, grouped, one per line: what `rectok recipes` prints."""
    recipes = bundled_recipes(kinds)
    pad = max((len(n) for n in recipes), default=0)
    blocks = []
    for kind in kinds:
        names = [n for n in recipes if n.startswith(kind + "/")]
        if names:
            blocks.append(f"{KINDS.get(kind, kind)}:\n" + "\n".join(f"  {n:<{pad}}  {recipes[n]}" for n in names))
    return "\n".join(blocks)
