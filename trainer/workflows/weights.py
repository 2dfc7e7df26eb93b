"""`rectok fetch-weights` and `rectok check-weights`: the weight files of configs/weights.yaml, downloaded
on request and verified.

A download goes to `FILE.part` beside the target; an interrupted one (a dropped connection, a killed
process) continues from the bytes already there with an HTTP Range request, within the same command (a few
retries) or on the next one. Only once the whole file is there and its SHA-256 (or the hash prefix the
manifest knows) and size match is it renamed to FILE; a mismatch deletes the `.part` and leaves no FILE. A
lock on the `.part` keeps two fetches of one file apart. Standard library only (urllib), no new dependency.
"""
from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from data.files import fsync_path
from models.weight_manifest import (
    MISSING,
    OK,
    UNVERIFIED,
    WRONG_SIZE,
    Entry,
    ManifestError,
    Verdict,
    check_digest,
    fetch_command,
    load_manifest,
    sha256_of,
    verify,
    weights_dir,
)
from trainer.config.tree import ConfigError

CHUNK = 1 << 20
TIMEOUT_S = 60.0  # per socket operation: a stalled server counts as an interruption
BACKOFF_S = 1.0  # wait BACKOFF_S * 2**attempt (at most 30 s) before retrying an interrupted transfer
FINAL_CODES = {400, 401, 403, 404, 405, 410, 451}  # no retry: the URL itself is wrong or refused
PART = ".part"


class FetchError(RuntimeError):
    pass


class _Interrupted(Exception):
    pass


@dataclass
class Outcome:
    name: str
    status: str  # fetched, present, skipped, failed
    line: str  # the one line reported for this file

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def select(names: list[str], manifest: str | None) -> list[Entry]:
    """The manifest's entries named (all of them for no names), in the order given; an unknown name lists
    the known ones."""
    try:
        entries = load_manifest(manifest)
    except ManifestError as e:
        raise ConfigError(str(e)) from None
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise ConfigError(f"unknown weights {', '.join(unknown)}; the manifest ({manifest or 'configs/weights.yaml'}) "
                          f"lists {', '.join(entries)}")
    return [entries[n] for n in dict.fromkeys(names)] if names else list(entries.values())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class _Progress:
    """A live line on a terminal (redrawn at most 5 times a second); nothing otherwise (the caller prints one
    line per file when it is done)."""

    def __init__(self, name: str, stream: TextIO, total: int | None):
        self.name, self.stream, self.total = name, stream, total
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.done, self.start, self.shown = 0, time.monotonic(), 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.live and now - self.shown >= 0.2:
            self.shown = now
            rate = self.done / max(now - self.start, 1e-9)
            of = f"/{_mb(self.total)} ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.stream.write(f"\r{self.name}: {_mb(self.done)}{of} at {_mb(int(rate))}/s   ")
            self.stream.flush()

    def clear(self) -> None:
        if self.live and self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _content_start(resp) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def download(url: str, part: str, size: int | None = None, retries: int = 5,
             progress: Callable[[int], None] | None = None) -> int:
    """Bring `url` into `part`, continuing from the bytes already in it (HTTP Range); `retries` more tries
    after an interrupted transfer or a server error. Returns the bytes this call transferred."""
    got, attempt = 0, 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if size is not None and have == size:
            return got  # complete: the checksum decides
        if size is not None and have > size:
            os.truncate(part, 0)
            have = 0
        headers = {"User-Agent": "rectok-fetch-weights", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as resp:
                if have and resp.status == 206 and _content_start(resp) != have:
                    os.truncate(part, 0)  # the server sent another range than asked: start over
                    raise _Interrupted(f"the server answered the range {resp.headers.get('Content-Range')!r}")
                if resp.status != 206:
                    have = 0  # the whole file, from its start (a server that ignores Range)
                length = resp.headers.get("Content-Length")
                expected = have + int(length) if length is not None else None
                written = have
                with open(part, "ab" if have else "wb") as f:
                    while block := resp.read(CHUNK):
                        f.write(block)
                        written += len(block)
                        got += len(block)
                        if progress is not None:
                            progress(len(block))
                    f.flush()
                    os.fsync(f.fileno())
                if expected is not None and written < expected:
                    raise _Interrupted(f"the connection closed after {written} of {expected} bytes")
                return got
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                return got  # nothing after the bytes already there: the .part is whole (the checksum decides)
            if e.code in FINAL_CODES:
                raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
            reason = f"HTTP {e.code} {e.reason}"
        except (_Interrupted, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = str(getattr(e, "reason", None) or e) or type(e).__name__
        if attempt >= retries:
            kept = os.path.getsize(part) if os.path.exists(part) else 0
            if not kept:
                raise FetchError(f"{url}: {reason}")
            raise FetchError(f"{url}: {reason}; {_mb(kept)} kept in {part}: run the same command again to continue")
        attempt += 1
        time.sleep(min(BACKOFF_S * 2 ** attempt, 30.0))


@contextlib.contextmanager
def _locked(part: str):
    """Holds an exclusive lock on `part` (created when missing): two fetches of one file would interleave."""
    with open(part, "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FetchError(f"{part} is being written by another rectok fetch-weights") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _verify_part(entry: Entry, part: str) -> Verdict:
    actual = os.path.getsize(part)
    if entry.size is not None and actual != entry.size:
        return Verdict(WRONG_SIZE, f"{actual} bytes, expected {entry.size}")
    return check_digest(entry, sha256_of(part))


def fetch_one(entry: Entry, directory: str, url: str | None = None, retries: int = 5,
              stream: TextIO = sys.stderr) -> Outcome:
    """Download one manifest entry into `directory` (see the module's docstring); an existing file that
    verifies is kept as it is."""
    final = os.path.join(directory, entry.file)
    if os.path.exists(final):
        verdict = verify(final, entry)
        if verdict.passing:
            return Outcome(entry.name, "present", f"present {entry.name}: {final} ({verdict.detail})")
        stream.write(f"{entry.name}: {final} is there but {verdict.status} ({verdict.detail}): downloading it "
                     f"again (the file stays until the new one verifies)\n")
    url = url or entry.url
    if not url:
        return Outcome(entry.name, "failed", f"failed {entry.name}: no public URL ({entry.access}); then "
                                             f"`{fetch_command(entry, directory)}`")
    os.makedirs(directory, exist_ok=True)
    part = final + PART
    start = time.monotonic()
    try:
        with _locked(part):
            resumed = os.path.getsize(part)
            progress = _Progress(entry.name, stream, entry.size)
            progress.done = resumed
            try:
                got = download(url, part, entry.size, retries, progress)
            except FetchError:
                if os.path.getsize(part) == 0:
                    os.unlink(part)  # nothing kept to continue from
                raise
            finally:
                progress.clear()
            verdict = _verify_part(entry, part)
            if not verdict.passing:
                os.unlink(part)
                raise FetchError(f"{url}: {verdict.status} ({verdict.detail}); {final} was not written and the "
                                 f"download was deleted")
            fsync_path(part)
            os.replace(part, final)
            fsync_path(directory)
    except FetchError as e:
        return Outcome(entry.name, "failed", f"failed {entry.name}: {e}")
    seconds = time.monotonic() - start
    rate = f", {_mb(int(got / seconds))}/s" if seconds > 0 and got else ""
    cont = f", continued after {_mb(resumed)} already there" if resumed else ""
    return Outcome(entry.name, "fetched", f"fetched {entry.name}: {final} ({_mb(got)} in {seconds:.1f} s{rate}"
                                          f"{cont}; {verdict.detail})")


def fetch_weights(names: list[str], directory: str | None = None, manifest: str | None = None,
                  url: str | None = None, retries: int = 5, stream: TextIO = sys.stderr) -> list[Outcome]:
    """Fetch the named entries (all with a public URL when none is named) into `directory` ($RECTOK_WEIGHTS,
    else ./weights); one line per file on `stream` as each ends."""
    entries = select(names, manifest)
    if url is not None and len(names) != 1:
        raise ConfigError("--url takes exactly one NAME (the file the URL is for)")
    directory = directory or weights_dir()
    outcomes = []
    for entry in entries:
        if not names and entry.gated:
            outcome = Outcome(entry.name, "skipped", f"skipped {entry.name}: gated ({entry.access}); then "
                                                     f"`{fetch_command(entry, directory)}`")
        else:
            outcome = fetch_one(entry, directory, url, retries, stream)
        stream.write(outcome.line + "\n")
        stream.flush()
        outcomes.append(outcome)
    return outcomes


@dataclass
class Check:
    entry: Entry
    path: str
    verdict: Verdict

    @property
    def line(self) -> str:
        head = f"{self.verdict.status:<14} {self.entry.name:<16} {self.path}"
        if self.verdict.status == OK or self.verdict.status == UNVERIFIED:
            return f"{head}  ({self.verdict.detail})"
        detail = "" if self.verdict.status == MISSING else f" ({self.verdict.detail})"
        return f"{head}{detail}  ->  {fetch_command(self.entry, os.path.dirname(self.path))}"


def check_weights(names: list[str], directory: str | None = None, manifest: str | None = None) -> list[Check]:
    """The named entries (all when none is named) as found in `directory`: ok, unverified (no checksum known),
    missing, wrong size or wrong checksum."""
    directory = directory or weights_dir()
    out = []
    for entry in select(names, manifest):
        path = os.path.join(directory, entry.file)
        out.append(Check(entry, path, verify(path, entry)))
    return out
