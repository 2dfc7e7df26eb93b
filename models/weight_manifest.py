"""The weights manifest (configs/weights.yaml) and the one weights directory.

The manifest names every weight file the recipes read, with its source, SHA-256 (or the hash prefix its
release name carries), size and licence. `verify` checks a file on disk against its entry; the start-up
checks (models/weights.py), `rectok check-weights` and `rectok fetch-weights` all use it.

The weights directory is one place: `run.weights_dir` when a config sets it, else $RECTOK_WEIGHTS, else
./weights. Recipe paths of the form `weights/FILE` resolve against it (`in_weights_dir`).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(REPO_ROOT, "configs", "weights.yaml")
WEIGHTS_ENV = "RECTOK_WEIGHTS"
DEFAULT_DIR = "weights"  # also the first component of the recipes' weight paths (`weights/FILE`)
_HEX = re.compile(r"[0-9a-f]+")

OK, MISSING, WRONG_SIZE, WRONG_CHECKSUM, UNVERIFIED = "ok", "missing", "wrong size", "wrong checksum", "unverified"
PASSING = (OK, UNVERIFIED)  # unverified: present, but the manifest has no checksum to compare with


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    name: str
    file: str
    url: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None
    title: str = ""
    access: str = ""
    licence: str = ""
    used_by: str = ""
    checksum_note: str = ""

    @property
    def gated(self) -> bool:
        return not self.url


@dataclass(frozen=True)
class Verdict:
    status: str  # one of OK, MISSING, WRONG_SIZE, WRONG_CHECKSUM, UNVERIFIED
    detail: str  # what was compared, or what differs

    @property
    def passing(self) -> bool:
        return self.status in PASSING


def _entry(raw: dict, where: str) -> Entry:
    fields = set(Entry.__dataclass_fields__)
    if not isinstance(raw, dict) or not raw.get("name") or not raw.get("file"):
        raise ManifestError(f"{where}: every entry needs a name and a file")
    unknown = set(raw) - fields
    if unknown:
        raise ManifestError(f"{where}: entry {raw['name']!r} has unknown fields {sorted(unknown)}")
    entry = Entry(**{k: (v.strip() if isinstance(v, str) else v) for k, v in raw.items()})
    for key in ("sha256", "sha256_prefix"):
        value = getattr(entry, key)
        if value is not None and not (isinstance(value, str) and _HEX.fullmatch(value)):
            raise ManifestError(f"{where}: {entry.name}.{key} must be lower-case hex, got {value!r}")
    if entry.sha256 is not None and len(entry.sha256) != 64:
        raise ManifestError(f"{where}: {entry.name}.sha256 must have 64 hex digits")
    if entry.sha256 and entry.sha256_prefix and not entry.sha256.startswith(entry.sha256_prefix):
        raise ManifestError(f"{where}: {entry.name}: sha256 does not start with sha256_prefix")
    if entry.size is not None and (not isinstance(entry.size, int) or entry.size <= 0):
        raise ManifestError(f"{where}: {entry.name}.size must be a positive number of bytes")
    if os.path.basename(entry.file) != entry.file:
        raise ManifestError(f"{where}: {entry.name}.file must be a file name, not a path")
    return entry


_cache: dict[tuple[str, int], dict[str, Entry]] = {}


def load_manifest(path: str | None = None) -> dict[str, Entry]:
    """name -> Entry, in the manifest's order (the repository's configs/weights.yaml by default)."""
    path = path or MANIFEST
    try:
        key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
    except FileNotFoundError:
        raise ManifestError(f"weights manifest not found: {path}") from None
    if key not in _cache:
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ManifestError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        entries = [_entry(raw, path) for raw in (data.get("weights") or [])]
        out = {e.name: e for e in entries}
        if len(out) != len(entries) or len({e.file for e in entries}) != len(entries):
            raise ManifestError(f"{path}: names and file names must be unique")
        _cache[key] = out
    return dict(_cache[key])


def entry_for_file(path: str, manifest: str | None = None) -> Entry | None:
    """The manifest entry whose file name is `path`'s (None for a file the manifest does not list)."""
    name = os.path.basename(path)
    try:
        return next((e for e in load_manifest(manifest).values() if e.file == name), None)
    except ManifestError:
        return None  # a broken manifest must not stop a run that names its files itself


def weights_dir(configured: str | None = None) -> str:
    """The weights directory: `configured` (run.weights_dir) when set, else $RECTOK_WEIGHTS, else ./weights.
    A configured or environment directory is made absolute (a run's saved config then names the files it read
    wherever it is resumed); the default stays `weights`, relative to the working directory."""
    chosen = configured or os.environ.get(WEIGHTS_ENV)
    return os.path.abspath(os.path.expanduser(chosen)) if chosen else DEFAULT_DIR


def in_weights_dir(path: str | None, directory: str) -> str | None:
    """`weights/FILE` (relative, first component `weights`) -> DIRECTORY/FILE; any other path unchanged
    (absolute paths, other relative paths, 'random', unset)."""
    if not path or os.path.isabs(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) < 2 or parts[0] != DEFAULT_DIR:
        return path
    return os.path.join(directory, *parts[1:])


def sha256_of(path: str, progress: Callable[[int], None] | None = None, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


def check_digest(entry: Entry, digest: str) -> Verdict:
    """`digest` (a file's full SHA-256) against the entry: the full value when the manifest has it, else the prefix."""
    if entry.sha256:
        if digest != entry.sha256:
            return Verdict(WRONG_CHECKSUM, f"sha256 {digest}, expected {entry.sha256}")
        return Verdict(OK, "sha256 matches")
    if entry.sha256_prefix:
        if not digest.startswith(entry.sha256_prefix):
            return Verdict(WRONG_CHECKSUM, f"sha256 {digest} does not start with {entry.sha256_prefix} (the "
                                           f"manifest knows only this prefix)")
        return Verdict(OK, f"sha256 starts with {entry.sha256_prefix} (the manifest knows only this prefix)")
    return Verdict(UNVERIFIED, f"sha256 {digest}; the manifest has no checksum to compare it with")


_verified: dict[tuple, Verdict] = {}


def verify(path: str, entry: Entry, progress: Callable[[int], None] | None = None) -> Verdict:
    """The file at `path` against its manifest entry: missing, wrong size (cheap, first), wrong checksum, ok
    or unverified. A file already verified in this process with the same size and modification time is not
    read again."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Verdict(MISSING, f"{path} does not exist")
    if not os.path.isfile(path):
        return Verdict(MISSING, f"{path} is not a file")
    if entry.size is not None and st.st_size != entry.size:
        return Verdict(WRONG_SIZE, f"{st.st_size} bytes, expected {entry.size}")
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, entry)
    if key not in _verified:
        _verified[key] = check_digest(entry, sha256_of(path, progress))
    return _verified[key]


def fetch_command(entry: Entry, directory: str) -> str:
    """The command that puts the entry's file into `directory`."""
    url = " --url SIGNED_URL" if entry.gated else ""
    return f"rectok fetch-weights {entry.name}{url} --dir {directory}"


def fetch_hint(path: str) -> str:
    """' Fetch it: `rectok fetch-weights NAME --dir DIR`' for a file the manifest lists, else ''."""
    entry = entry_for_file(path)
    if entry is None:
        return ""
    gated = f" ({entry.name} is gated: {entry.access})" if entry.gated and entry.access else ""
    return f" Fetch it: `{fetch_command(entry, os.path.dirname(path) or '.')}`{gated}."
