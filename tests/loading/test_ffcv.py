"""FFCV: the .beton writer (ADM crop, JPEG/raw, corrupt files skipped and reported) and the loader
(per-rank orders, evaluation without drops), against the PIL fallback and an independent crop.

Everything here is real: JPEG files written by PIL, .beton files written by FFCV's writer, FFCV's
compiled loader.
"""
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import reference_adm  # the crop written out independently of data/images.py

from data import DataError, eval_batches, load_batch, open_images, rank_batches, sequential_batches
from data.ffcv_loader import report_path
from data.ffcv_writer import write_ffcv
from trainer.cli import main
from trainer.config.catalog import REPO_ROOT

SIZE = 64
# (synset, file, width, height, mode): sizes exercise BOX halving (short side >= 128), none, and odd ratios.
FILES = [("n02", "a.JPEG", 200, 150, "RGB"), ("n02", "b.JPEG", 97, 140, "RGB"), ("n02", "c.JPEG", 300, 64, "L"),
         ("n01", "d.JPEG", 520, 260, "RGB"), ("n01", "e.JPEG", 130, 130, "CMYK"), ("n01", "f.JPEG", 90, 90, "RGB"),
         ("n03", "g.JPEG", 256, 171, "RGB"), ("n03", "h.JPEG", 171, 256, "RGB"), ("n03", "i.JPEG", 180, 120, "RGB"),
         ("n03", "j.JPEG", 640, 480, "RGB"), ("n02", "k.JPEG", 150, 100, "RGB")]
CORRUPT = [("n01", "truncated.JPEG"), ("n03", "garbage.JPEG")]


def smooth_image(rng, w, h, mode):
    """Distinct, photo-like content (smooth colour fields and a few edges), so JPEG error stays small."""
    low = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(low).copy()
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet") / "train"
    rng = np.random.default_rng(0)
    for synset, name, w, h, mode in FILES:
        os.makedirs(root / synset, exist_ok=True)
        smooth_image(rng, w, h, mode).save(root / synset / name, quality=92)
    whole = io.BytesIO()
    smooth_image(rng, 300, 200, "RGB").save(whole, "JPEG", quality=92)
    (root / "n01" / "truncated.JPEG").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "n03" / "garbage.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return str(root)


def expected(folder):
    """(reference crop, label) per readable file in the writer's order: sorted synsets, then sorted names."""
    synsets = sorted({s for s, *_ in FILES})
    out = []
    for s in synsets:
        for name in sorted(n for syn, n, *_ in FILES if syn == s):
            with Image.open(os.path.join(folder, s, name)) as img:
                out.append((reference_adm(img.convert("RGB"), SIZE), synsets.index(s)))
    return out


@pytest.fixture(scope="module")
def betons(jpeg_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("betons")
    return {storage: (str(out / f"{storage}.beton"),
                      write_ffcv(jpeg_folder, str(out / f"{storage}.beton"), SIZE, storage, workers=2, progress=False))
            for storage in ("raw", "jpeg")}


def read_all(source, batch=4, workers=2):
    images, labels, ids = zip(*source.batches(sequential_batches(range(len(source)), batch), workers))
    return torch.cat(images), torch.cat(labels), torch.cat(ids)


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.quick
def test_write_skips_and_reports_corrupt_files(betons, jpeg_folder):
    for path, report in betons.values():
        assert report["written"] == len(FILES) and report["skipped"] == len(CORRUPT)
        assert sorted(os.path.basename(s["path"]) for s in report["skipped_files"]) == sorted(n for _, n in CORRUPT)
        assert all(s["error"] for s in report["skipped_files"])
        with open(report_path(path)) as f:
            assert json.load(f)["skipped_files"] == report["skipped_files"]
        assert report["classes"] == ["n01", "n02", "n03"]
        assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp-" in f]


@pytest.mark.quick
def test_raw_beton_holds_exactly_the_adm_crops_once_with_sorted_synset_labels(betons, jpeg_folder):
    source = open_images(betons["raw"][0], "ffcv", SIZE)
    images, labels, ids = read_all(source)
    want = expected(jpeg_folder)
    assert len(source) == len(want) and ids.tolist() == list(range(len(want)))
    assert source.classes == ["n01", "n02", "n03"]
    assert labels.tolist() == source.labels.tolist() == [label for _, label in want]
    for got, (ref, _) in zip(images, want):  # grayscale and CMYK files included, converted to RGB
        assert got.shape == (3, SIZE, SIZE) and got.dtype == torch.uint8
        assert np.array_equal(got.permute(1, 2, 0).numpy(), ref)


@pytest.mark.quick
def test_jpeg_beton_is_within_jpeg_error(betons, jpeg_folder):
    images, labels, _ = read_all(open_images(betons["jpeg"][0], "ffcv", SIZE))
    want = expected(jpeg_folder)
    for got, (ref, _) in zip(images, want):
        # The yardstick: the same crop through PIL's JPEG codec at the same quality (95).
        buf = io.BytesIO()
        Image.fromarray(ref).save(buf, "JPEG", quality=95)
        yardstick = ((np.asarray(Image.open(buf).convert("RGB")).astype(np.float64) - ref) ** 2).mean()
        mse = ((got.permute(1, 2, 0).numpy().astype(np.float64) - ref) ** 2).mean()
        assert 0 < mse <= 2 * yardstick + 2, (mse, yardstick)  # measured: within 1 dB of PIL's error
    from ffcv.reader import Reader
    stored = {k: int(Reader(path).alloc_table["size"].sum()) for k, (path, _) in betons.items()}
    assert stored["raw"] == len(FILES) * SIZE * SIZE * 3 and stored["jpeg"] < stored["raw"] / 2


@pytest.mark.quick
def test_fallback_loader_yields_what_ffcv_yields(betons, jpeg_folder):
    """Same files, same crop, same batches: the PIL loader on the folder equals FFCV on the raw .beton."""
    ffcv, pil = open_images(betons["raw"][0], "ffcv", SIZE), open_images(jpeg_folder, "pil", SIZE)
    assert pil.classes == ffcv.classes
    # The folder also lists the two corrupt files (the fallback skips them when read); compare the rest.
    readable = [i for i, (p, _) in enumerate(pil.samples) if os.path.basename(p) not in {n for _, n in CORRUPT}]
    x_pil, y_pil = load_batch(pil, readable)
    x_ffcv, y_ffcv, _ = read_all(ffcv)
    assert torch.equal(x_pil, x_ffcv) and torch.equal(y_pil, y_ffcv)


@pytest.mark.quick
def test_two_ranks_disjoint_reproducible_and_new_each_epoch(betons):
    source = open_images(betons["raw"][0], "ffcv", SIZE)
    by_digest = {digest(x): i for i, x in enumerate(read_all(source)[0])}

    def epoch(seed, epoch, rank):
        """What a rank reads in an epoch, identified by pixels (not by the ids the loader reports)."""
        seen = []
        for images, _, ids in source.batches(rank_batches(len(source), 2, seed, epoch, rank, 2), 2):
            got = [by_digest[digest(x)] for x in images]
            assert got == ids.tolist()
            seen += got
        return seen

    r0, r1 = epoch(0, 0, 0), epoch(0, 0, 1)
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 4  # 11 images, 2 ranks x 2: two steps, 3 dropped
    assert len(set(r0 + r1)) == 4 * (len(source) // 4)
    assert epoch(0, 0, 0) == r0 and epoch(0, 0, 1) == r1  # reproducible from (seed, epoch)
    assert (epoch(0, 1, 0), epoch(0, 1, 1)) != (r0, r1)  # a new order next epoch
    assert epoch(1, 0, 0) != r0


@pytest.mark.quick
def test_evaluation_reads_every_image_once_across_ranks(betons):
    """11 images, 2 ranks, batches of 4: FFCV's default drop_last would lose the partial batches."""
    source = open_images(betons["raw"][0], "ffcv", SIZE)
    seen = []
    for rank in range(2):
        for images, _, ids in source.batches(eval_batches(len(source), 4, rank, 2), 2):
            assert len(images) == len(ids)
            seen += ids.tolist()
    assert sorted(seen) == list(range(len(source)))


@pytest.mark.quick
def test_cli_write_ffcv_from_a_list_file(jpeg_folder, tmp_path, capsys):
    lines = [f"{os.path.join(s, n)} {label}" for label, (s, n, *_) in enumerate(FILES[:4])]
    (tmp_path / "list.txt").write_text("\n".join(lines + ["n01/truncated.JPEG 9"]) + "\n")
    out = tmp_path / "out" / "list.beton"
    assert main(["data", "write-ffcv", "--src", str(tmp_path / "list.txt"), "--root", jpeg_folder,
                 "--out", str(out), "--size", str(SIZE), "--storage", "raw", "--workers", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written"] == 4 and printed["skipped"] == 1 and printed["report"] == report_path(str(out))
    source = open_images(str(out), "ffcv", SIZE)
    assert source.labels.tolist() == [0, 1, 2, 3] and source.classes is None
    assert main(["data", "write-ffcv", "--src", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "image source not found" in capsys.readouterr().err


@pytest.mark.quick
def test_a_failed_write_leaves_the_previous_file(jpeg_folder, tmp_path, monkeypatch):
    """A file that passes the check but fails in the writer (changed meanwhile): the write is discarded."""
    out = tmp_path / "keep.beton"
    out.write_bytes(b"previous")
    import data.ffcv_writer as writer
    monkeypatch.setattr(writer, "decode_check", lambda path: None)  # pretend the corrupt files decoded
    with pytest.raises(DataError, match="became unreadable during the write"):
        write_ffcv(jpeg_folder, str(out), SIZE, "raw", workers=2, progress=False)
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["keep.beton"]


@pytest.mark.quick
def test_clear_errors(betons, jpeg_folder, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="--size 32"):
        open_images(betons["raw"][0], "ffcv", 32)
    with pytest.raises(DataError, match="rectok data write-ffcv --src .*train .*data.loader=pil"):
        open_images(jpeg_folder, "ffcv", SIZE)
    with pytest.raises(DataError, match="data.loader=ffcv"):
        open_images(betons["raw"][0], "pil", SIZE)
    (tmp_path / "junk.beton").write_bytes(b"\0" * 16)
    with pytest.raises(DataError, match="not a readable FFCV file"):
        open_images(str(tmp_path / "junk.beton"), "ffcv", SIZE)
    # FFCV missing (it needs system libraries): importing it fails; the fallback still works.
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(DataError, match="FFCV cannot be imported.*apt-get install.*data.loader=pil"):
        open_images(betons["raw"][0], "ffcv", SIZE)
    assert len(open_images(jpeg_folder, "pil", SIZE)) == len(FILES) + len(CORRUPT)


def test_training_reads_ffcv_and_pil_identically(micro):
    """The tokenizer's first steps on the default dataset: FFCV (raw .beton) and PIL give the same losses."""
    from trainer.config.recipes import load_config
    from trainer.tasks.training import train
    runs = {loader: train(load_config("rectok/tiny_stage1", micro + [
        f"run.name={loader}", f"data.loader={loader}", "run.max_steps=2", "eval.num_images=4"]))
        for loader in ("ffcv", "pil")}
    assert runs["ffcv"]["last_train"]["total"] == pytest.approx(runs["pil"]["last_train"]["total"], rel=1e-6)
    assert runs["ffcv"]["eval/psnr_ema"] == pytest.approx(runs["pil"]["eval/psnr_ema"], rel=1e-6)


def test_ffcv_leaves_torch_thread_count_alone(betons):
    """FFCV sets torch's intra-op threads to its worker count on import, per Loader and per epoch; the
    loader undoes it (it had made the demo's DiT train on one core). A fresh process sees the import."""
    code = ("import torch; torch.set_num_threads(3); from data import open_images, sequential_batches; "
            f"s = open_images({betons['raw'][0]!r}, 'ffcv', {SIZE}); "
            "[b for b in s.batches(sequential_batches(range(len(s)), 4), 1)]; print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "3"
