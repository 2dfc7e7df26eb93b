"""Issue 27: `rectok fetch-weights` and `rectok check-weights` against an HTTP server started here on
127.0.0.1 (nothing leaves the machine): a good file fetched and verified, a wrong checksum refused with no
file left, an interrupted transfer continued with a Range request (in the same run and in the next one), a
404 reported; check-weights on good, missing, truncated and corrupted files; the start-up error for a
missing or wrong weights file names the fetch command; recipe paths `weights/FILE` resolve against
$RECTOK_WEIGHTS or run.weights_dir."""
from __future__ import annotations

import hashlib
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from models.weight_manifest import in_weights_dir, load_manifest, weights_dir
from models.weights import MissingWeightsError, WrongWeightsError, require_weights
from trainer.cli import main
from trainer.config.recipes import load_config, with_overrides
from trainer.workflows import weights as fetching

pytestmark = pytest.mark.quick

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # several download chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves `files` (path -> bytes) with Range support; a path in `drop_once` sends its headers and half
    its body, then closes the connection, the first time it is asked for. `requests` records (path, Range)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in server.drop_once:
                    server.drop_once.discard(self.path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def setup(server, tmp_path, monkeypatch):
    """A manifest of files on the local server, and an empty weights directory."""
    monkeypatch.setattr(fetching, "BACKOFF_S", 0.0)
    server.files["/good.bin"] = PAYLOAD
    server.files["/flaky.bin"] = PAYLOAD
    entries = [
        {"name": "good", "file": "good.bin", "url": f"{server.url}/good.bin", "sha256": SHA, "size": len(PAYLOAD)},
        {"name": "prefix-only", "file": "prefix.bin", "url": f"{server.url}/good.bin", "sha256_prefix": SHA[:8]},
        {"name": "bad-sum", "file": "bad.bin", "url": f"{server.url}/good.bin", "sha256": "0" * 64},
        {"name": "flaky", "file": "flaky.bin", "url": f"{server.url}/flaky.bin", "sha256": SHA},
        {"name": "gone", "file": "gone.bin", "url": f"{server.url}/gone.bin", "sha256": SHA},
        {"name": "gated", "file": "gated.bin", "url": None, "access": "ask the owners", "sha256": SHA},
    ]
    manifest = tmp_path / "weights.yaml"
    manifest.write_text(yaml.safe_dump({"weights": entries}))
    return str(manifest), str(tmp_path / "w")


def _fetch(setup, *args):
    manifest, directory = setup
    return main(["fetch-weights", *args, "--dir", directory, "--manifest", manifest])


def _lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def test_a_good_file_is_fetched_verified_and_then_left_alone(setup, server, capsys):
    assert _fetch(setup, "good", "prefix-only") == 0
    err = capsys.readouterr().err
    directory = setup[1]
    with open(os.path.join(directory, "good.bin"), "rb") as f:
        assert f.read() == PAYLOAD
    assert sorted(os.listdir(directory)) == ["good.bin", "prefix.bin"]  # no .part left
    # stderr is not a terminal: one line per file, no progress redraws
    assert len(err.splitlines()) == 2 and "\r" not in err
    assert _lines(err, "fetched good:") and "sha256 matches" in err
    assert "the manifest knows only this prefix" in _lines(err, "fetched prefix-only:")[0]
    assert _fetch(setup, "good") == 0
    assert _lines(capsys.readouterr().err, "present good:")
    assert server.ranges("/good.bin") == [None, None]  # the second run downloaded nothing


def test_a_wrong_checksum_leaves_no_file(setup, capsys):
    assert _fetch(setup, "bad-sum") == 1
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith("failed bad-sum:") and "wrong checksum" in line and f"sha256 {SHA}" in line
    assert "bad.bin was not written" in line
    assert os.listdir(setup[1]) == []  # neither bad.bin nor bad.bin.part


def test_an_interrupted_transfer_is_continued_in_the_same_run(setup, server, capsys):
    server.drop_once.add("/flaky.bin")
    assert _fetch(setup, "flaky") == 0
    assert _lines(capsys.readouterr().err, "fetched flaky:")
    assert server.ranges("/flaky.bin") == [None, f"bytes={len(PAYLOAD) // 2}-"]
    with open(os.path.join(setup[1], "flaky.bin"), "rb") as f:
        assert f.read() == PAYLOAD


def test_an_interrupted_transfer_is_continued_by_the_next_run(setup, server, capsys):
    server.drop_once.add("/flaky.bin")
    assert _fetch(setup, "flaky", "--retries", "0") == 1
    line, = capsys.readouterr().err.splitlines()
    assert "connection closed after" in line and "run the same command again to continue" in line
    part = os.path.join(setup[1], "flaky.bin.part")
    assert os.listdir(setup[1]) == ["flaky.bin.part"] and os.path.getsize(part) == len(PAYLOAD) // 2
    assert main(["check-weights", "flaky", "--dir", setup[1], "--manifest", setup[0]]) == 1  # not there yet
    capsys.readouterr()
    assert _fetch(setup, "flaky") == 0
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith("fetched flaky:") and "continued after" in line
    assert server.ranges("/flaky.bin")[-1] == f"bytes={len(PAYLOAD) // 2}-"
    assert os.listdir(setup[1]) == ["flaky.bin"]
    with open(os.path.join(setup[1], "flaky.bin"), "rb") as f:
        assert f.read() == PAYLOAD


def test_a_404_and_a_gated_file_are_reported_clearly(setup, server, capsys):
    assert _fetch(setup, "gone") == 1
    line, = capsys.readouterr().err.splitlines()
    assert line == f"failed gone: {server.url}/gone.bin: HTTP 404 Not Found"
    assert server.ranges("/gone.bin") == [None]  # not retried
    assert os.listdir(setup[1]) == []
    assert _fetch(setup, "gated") == 1
    line, = capsys.readouterr().err.splitlines()
    assert "ask the owners" in line and f"rectok fetch-weights gated --url SIGNED_URL --dir {setup[1]}" in line
    assert _fetch(setup, "gated", "--url", f"{server.url}/good.bin") == 0  # a URL given by hand, still verified
    assert _fetch(setup, "nonesuch") == 2
    assert "unknown weights nonesuch" in capsys.readouterr().err


def test_check_weights_on_good_missing_truncated_and_corrupted_files(setup, capsys):
    manifest, directory = setup
    assert _fetch(setup, "good") == 0
    capsys.readouterr()
    check = ["check-weights", "--dir", directory, "--manifest", manifest]
    assert main([*check, "good"]) == 0
    assert _lines(capsys.readouterr().out, "ok ")
    assert main([*check, "good", "flaky"]) == 1
    out = capsys.readouterr().out
    assert _lines(out, "missing        flaky") and f"rectok fetch-weights flaky --dir {directory}" in out
    path = os.path.join(directory, "good.bin")
    with open(path, "r+b") as f:  # same size, one byte changed
        f.seek(1000)
        f.write(bytes([PAYLOAD[1000] ^ 0xFF]))
    assert main([*check, "good"]) == 1
    assert _lines(capsys.readouterr().out, "wrong checksum good")
    os.truncate(path, 100)
    assert main([*check, "good"]) == 1
    out = capsys.readouterr().out
    assert _lines(out, "wrong size     good") and f"100 bytes, expected {len(PAYLOAD)}" in out
    assert _fetch(setup, "good") == 0  # a wrong file is replaced once the new one verifies
    assert main([*check, "good"]) == 0


def test_the_repository_manifest_lists_the_six_files_and_the_reference_batch():
    entries = load_manifest()
    assert {"dinov3-l16", "dinov2-l14", "siglip2-l16", "vgg16", "convnext-small", "inception-fid",
            "adm-imagenet256"} == set(entries)
    for e in entries.values():
        assert e.licence and e.used_by and e.checksum_note and (e.url or e.access)
        if e.sha256_prefix:  # torch.hub's names carry the leading hex digits of the file's SHA-256
            assert e.file.rsplit(".", 1)[0].endswith(e.sha256_prefix) or e.name == "dinov3-l16"
    assert entries["dinov3-l16"].gated and not entries["dinov2-l14"].gated


def test_recipe_weight_paths_resolve_against_the_weights_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("RECTOK_WEIGHTS", raising=False)
    cfg = load_config("rectok/stage1_d32")
    assert cfg.teacher.weights == "weights/dinov2_vitl14_pretrain.pth"  # default: ./weights, as written
    monkeypatch.setenv("RECTOK_WEIGHTS", str(tmp_path / "w"))
    cfg = load_config("rectok/stage1_d32")
    shared = str(tmp_path / "w")
    assert cfg.teacher.weights == os.path.join(shared, "dinov2_vitl14_pretrain.pth")
    assert cfg.loss.lpips_vgg_weights == os.path.join(shared, "vgg16-397923af.pth")
    assert cfg.loss.convnext_weights == os.path.join(shared, "convnext_small-0c510722.pth")
    assert cfg.eval.inception_weights == os.path.join(shared, "pt_inception-2015-12-05-6726825d.pth")
    assert cfg.eval.reference == os.path.join(shared, "VIRTUAL_imagenet256_labeled.npz")
    assert with_overrides(cfg, []).teacher.weights == cfg.teacher.weights  # resolving again changes nothing
    # run.weights_dir beats the environment; absolute paths, other relative paths and 'random' stay
    cfg = load_config("rectok/stage1_d32", [f"run.weights_dir={tmp_path / 'mine'}", "loss.convnext_weights=random",
                                            "loss.lpips_vgg_weights=/abs/vgg.pth", "eval.reference=stats/val.npz"])
    assert cfg.teacher.weights == str(tmp_path / "mine" / "dinov2_vitl14_pretrain.pth")
    assert (cfg.loss.convnext_weights, cfg.loss.lpips_vgg_weights, cfg.eval.reference) == (
        "random", "/abs/vgg.pth", "stats/val.npz")
    assert weights_dir("rel") == os.path.abspath("rel") and in_weights_dir("./weights/a/b.pth", "/d") == "/d/a/b.pth"


def test_a_missing_or_wrong_weights_file_fails_at_start_up_with_the_fetch_command(tmp_path, monkeypatch, capsys):
    shared = tmp_path / "w"
    monkeypatch.setenv("RECTOK_WEIGHTS", str(shared))
    over = ["loss.lpips_vgg_weights=weights/vgg16-397923af.pth", f"run.output_dir={tmp_path / 'runs'}"]
    assert main(["train", "rectok/tiny_stage1", *over]) == 2
    err, = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rectok: error:")]
    assert "loss.lpips_vgg_weights" in err and str(shared / "vgg16-397923af.pth") in err
    assert f"`rectok fetch-weights vgg16 --dir {shared}`" in err
    assert not (tmp_path / "runs").exists()  # failed before anything was written
    shared.mkdir()
    (shared / "vgg16-397923af.pth").write_bytes(b"not the VGG16 release")
    with pytest.raises(WrongWeightsError, match=rf"wrong size.*`rectok fetch-weights vgg16 --dir {shared}`"):
        require_weights(str(shared / "vgg16-397923af.pth"), "LPIPS", "loss.lpips_vgg_weights")
    with pytest.raises(MissingWeightsError, match=r"rectok fetch-weights dinov3-l16 --url SIGNED_URL .*gated"):
        require_weights(str(shared / "dinov3_vitl16_pretrain_lvd1689m.pth"), "teacher", "teacher.weights")
    mine = tmp_path / "my_teacher.pth"  # a file the manifest does not list: only its presence is checked
    mine.write_bytes(b"x")
    assert require_weights(str(mine), "teacher", "teacher.weights") == str(mine)
