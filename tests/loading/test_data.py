"""The default dataset, the PIL fallback loader with the ADM crop, list files, and the per-rank orders."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import (
    DataError,
    ImageFolderDataset,
    adm_center_crop,
    ensure_default_dataset,
    epoch_order,
    eval_batches,
    list_images,
    rank_batches,
)
from data.default_dataset import CLASSES

pytestmark = pytest.mark.quick


def test_default_dataset_layout_and_determinism(tmp_path, dataset_dir):
    root = ensure_default_dataset(dataset_dir, image_size=32, per_class_train=16, per_class_val=4)
    ds = ImageFolderDataset(os.path.join(root, "train"), 32)
    assert ds.classes == sorted(CLASSES) and len(ds) == 16 * len(CLASSES)
    assert len(ImageFolderDataset(os.path.join(root, "val"), 32)) == 4 * len(CLASSES)
    x, label, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and label == 0
    again = ensure_default_dataset(str(tmp_path), image_size=32, per_class_train=16, per_class_val=4)
    assert torch.equal(ImageFolderDataset(os.path.join(again, "train"), 32)[5][0], ds[5][0])


def test_default_dataset_classes_are_separable(dataset_dir):
    """A nearest-class-mean classifier on simple image statistics beats chance by a wide margin."""
    root = ensure_default_dataset(dataset_dir, image_size=32, per_class_train=16, per_class_val=4)

    def feats(split):
        ds = ImageFolderDataset(os.path.join(root, split), 32)
        xs, ys = zip(*[(ds[i][0], ds[i][1]) for i in range(len(ds))])
        x = torch.stack(xs).float() / 127.5 - 1
        edges = torch.cat([(x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 3)),
                           (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2))], 1)
        return edges, torch.tensor(ys)

    xtr, ytr = feats("train")
    xva, yva = feats("val")
    means = torch.stack([xtr[ytr == c].mean(0) for c in range(len(CLASSES))])
    acc = (torch.cdist(xva, means).argmin(1) == yva).float().mean().item()
    assert acc > 0.3  # chance is 0.1


def reference_adm(img, size):
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    cy, cx = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[cy:cy + size, cx:cx + size]


@pytest.mark.parametrize("wh", [(300, 200), (97, 140), (1030, 517), (64, 64)])
def test_adm_center_crop(wh):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    out = adm_center_crop(img, 64)
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), reference_adm(img, 64))


def test_corrupt_grayscale_and_cmyk_images(tmp_path, caplog):
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "train" / cls)
    Image.new("RGB", (40, 50), (255, 0, 0)).save(tmp_path / "train" / "a" / "0.jpg")
    Image.new("L", (40, 40), 128).save(tmp_path / "train" / "a" / "1.png")
    Image.new("CMYK", (48, 40), (0, 255, 0, 0)).save(tmp_path / "train" / "b" / "2.jpg")
    (tmp_path / "train" / "b" / "3.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = ImageFolderDataset(str(tmp_path / "train"), 32)
    assert len(ds) == 4 and [s[1] for s in ds.samples] == [0, 0, 1, 1]
    assert ds[1][0].shape == (3, 32, 32)  # grayscale -> RGB
    assert ds[2][0].shape == (3, 32, 32)  # CMYK -> RGB
    x, label, idx = ds[3]  # corrupt: skipped, the next readable image stands in, counted
    assert idx == 0 and ds.num_skipped == 1
    assert "3.jpg" in caplog.text


def test_missing_or_empty_split_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        ImageFolderDataset(str(tmp_path / "train"), 32)
    with pytest.raises(DataError, match="no images under"):
        ImageFolderDataset(str(tmp_path), 32)


def test_list_file(tmp_path):
    """`<relative path> <label>` lines, relative to the list's folder; comments and blank lines ignored."""
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 36), (i * 80, 0, 0)).save(tmp_path / "img" / f"my image {i}.png")
    (tmp_path / "train.txt").write_text("# path label\nimg/my image 0.png 7\n\nimg/my image 2.png 3\n")
    ds = ImageFolderDataset(str(tmp_path / "train.txt"), 32)
    assert len(ds) == 2 and ds.labels.tolist() == [7, 3] and ds.classes is None
    assert ds[1][0][0, 0, 0].item() == 160
    (tmp_path / "bad.txt").write_text("img/my image 0.png seven\n")
    with pytest.raises(DataError, match=r"bad\.txt:1: expected '<relative path> <label>'"):
        list_images(str(tmp_path / "bad.txt"))


def test_rank_batches_disjoint_reproducible_and_new_each_epoch():
    n, batch, world = 103, 4, 3
    per_rank = [rank_batches(n, batch, seed=1, epoch=0, rank=r, world=world) for r in range(world)]
    flat = [i for b in per_rank for step in b for i in step]
    assert len(flat) == len(set(flat)) == (n // (batch * world)) * batch * world  # tail dropped
    assert all(len(b) == n // (batch * world) for b in per_rank)
    assert rank_batches(n, batch, 1, 0, 0, world) == per_rank[0]
    assert rank_batches(n, batch, 1, 1, 0, world) != per_rank[0]
    assert not torch.equal(epoch_order(n, 1, 0), epoch_order(n, 2, 0))


@pytest.mark.parametrize("n,world", [(103, 3), (5, 4), (64, 2), (3, 1)])
def test_eval_batches_cover_every_sample_once(n, world):
    shares = [eval_batches(n, 8, r, world) for r in range(world)]
    flat = [i for s in shares for b in s for i in b]
    assert flat == list(range(n))  # every sample once, in order, nothing dropped
    sizes = [sum(map(len, s)) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and all(len(b) <= 8 for s in shares for b in s)
