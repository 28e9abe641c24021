"""Datasets of ``tensorcompress run``: target, source, user data, splits and batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tensorcompress.experiments import data as D


def test_digits_are_upscaled_rgb_with_ten_balanced_classes() -> None:
    d = D.digits(24)
    assert d.images.shape == (1797, 3, 24, 24) and d.images.dtype == torch.uint8
    assert d.classes == tuple(str(k) for k in range(10))
    assert torch.bincount(d.labels).min() >= 170
    # Grey: the three channels are equal; ink is bright on a dark background.
    assert torch.equal(d.images[:, 0], d.images[:, 1])
    assert d.images[:, :, 0, 0].float().mean() < 20 and d.images.max() > 200


def test_to_input_maps_bytes_to_standardised_floats() -> None:
    x = D.to_input(torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.flatten(), torch.tensor([-2.0, 128 / 255 / 0.25 - 2.0, 2.0]))


def test_shape_batches_are_pure_functions_of_seed_and_index() -> None:
    a = D.shape_batch(40, 32, seed=3, index=5)
    b = D.shape_batch(40, 32, seed=3, index=5)
    c = D.shape_batch(40, 32, seed=3, index=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (40, 3, 32, 32) and a[0].dtype == torch.uint8
    assert a[1].min() >= 0 and a[1].max() < len(D.SHAPE_CLASSES)


def test_every_shape_class_draws_a_visible_pattern() -> None:
    k = len(D.SHAPE_CLASSES)
    assert k == len(D.GEOMETRIC_CLASSES) + D.N_GLYPHS == 40
    labels = np.repeat(np.arange(k), 6)
    images = D.render_shapes(labels, 32, np.random.default_rng(0))
    assert images.shape == (6 * k, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    # Each image has a foreground: its grey levels spread well beyond the
    # pixel noise (whose 1st-99th percentile spread is about 0.11).
    grey_flat = images.mean(axis=1).reshape(6 * k, -1)
    spread = np.percentile(grey_flat, 99, axis=1) - np.percentile(grey_flat, 1, axis=1)
    assert spread.min() > 0.18
    # The glyphs are the same strokes up to jitter: copies of one glyph agree
    # far better than copies of different glyphs (shape only: colours removed).
    grey = images.mean(axis=1).reshape(k, 6, -1)
    ink = np.abs(grey - np.median(grey, axis=2, keepdims=True)) > 0.15
    glyphs = ink[len(D.GEOMETRIC_CLASSES) :].astype(float)

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return float((a * b).sum() / max(((a + b) > 0).sum(), 1))

    same = np.mean([iou(g[0], g[j]) for g in glyphs for j in range(1, 6)])
    other = np.mean([iou(glyphs[i, 0], glyphs[i + 1, 0]) for i in range(len(glyphs) - 1)])
    assert same > 1.5 * other


def test_alphabet_is_fixed() -> None:
    a, b = D.alphabet(), D.alphabet()
    assert len(a) == D.N_GLYPHS and all(1 <= g.shape[0] <= 3 and g.shape[1:] == (3, 2) for g in a)
    assert a is b  # computed once, from a constant seed


def test_shapes_dataset_matches_the_stream() -> None:
    data = D.shapes(300, 16, seed=1)
    first = D.shape_batch(256, 16, seed=1, index=0)
    assert len(data) == 300 and torch.equal(data.images[:256], first[0])


def test_split_is_stratified_disjoint_and_seeded() -> None:
    d = D.digits(16)
    train, test = D.split(d, 0.25, seed=0)
    again, _ = D.split(d, 0.25, seed=0)
    other, _ = D.split(d, 0.25, seed=1)
    assert len(train) + len(test) == len(d)
    assert torch.equal(train.images, again.images)
    assert not torch.equal(train.images, other.images)
    share = torch.bincount(test.labels, minlength=10) / torch.bincount(d.labels, minlength=10)
    assert float(share.min()) > 0.22 and float(share.max()) < 0.28
    with pytest.raises(ValueError, match="test fraction"):
        D.split(d, 1.0, seed=0)


def test_subsample_keeps_the_count_and_every_class() -> None:
    d = D.digits(16)
    small = D.subsample(d, 57, seed=0)
    assert len(small) == 57 and set(small.labels.tolist()) == set(range(10))
    assert torch.equal(small.images, D.subsample(d, 57, seed=0).images)
    assert D.subsample(d, None, seed=0) is d
    with pytest.raises(ValueError, match="at least one each"):
        D.subsample(d, 5, seed=0)


def test_batch_indices_shard_one_permutation_over_processes() -> None:
    n, bs = 103, 8
    shards = [D.batch_indices(n, bs, seed=0, epoch=2, rank=r, world=3) for r in range(3)]
    assert {len(s) for s in shards} == {4}  # 103 // 3 = 34 per rank -> 4 full batches
    seen = torch.cat([torch.cat(s) for s in shards])
    assert len(set(seen.tolist())) == seen.numel()  # disjoint
    single = D.batch_indices(n, bs, seed=0, epoch=2)
    assert torch.equal(torch.cat(single), torch.cat(D.batch_indices(n, bs, seed=0, epoch=2)))
    assert not torch.equal(torch.cat(single), torch.cat(D.batch_indices(n, bs, seed=0, epoch=3)))
    assert len(D.batch_indices(n, bs, seed=0, epoch=0, drop_last=False)) == 13


# ---------------------------------------------------------------------------
# User data
# ---------------------------------------------------------------------------


def _folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 12)) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


def test_image_folder_loads_with_sorted_class_names(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", {"cat": 3, "dog": 2})
    (root / "dog" / "notes.txt").write_text("not an image")
    data, test = D.load_data(root, 16)
    assert test is None and data.classes == ("cat", "dog")
    assert data.images.shape == (5, 3, 16, 16) and data.labels.tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("layout", ["nhwc-uint8", "nchw-float", "gray", "float-255"])
def test_npz_layouts(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 12, 12, 3), dtype=np.uint8)
    arr: np.ndarray
    if layout == "nchw-float":
        arr = np.moveaxis(x, -1, 1).astype(np.float32) / 255
    elif layout == "gray":
        arr = x[..., 0]
    elif layout == "float-255":
        arr = x.astype(np.float64)
    else:
        arr = x
    path = tmp_path / "d.npz"
    np.savez(path, x=arr, y=np.array(["b", "a"] * 5))
    data, _ = D.load_data(path, 12)
    assert data.classes == ("a", "b") and data.labels.tolist() == [1, 0] * 5
    expected = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    if layout == "gray":
        expected = expected[:, :1].expand(-1, 3, -1, -1)
    assert (data.images.int() - expected.int()).abs().max() <= 1


def test_npz_with_its_own_test_split(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    x = np.zeros((6, 8, 8, 3), np.uint8)
    np.savez(path, x=x, y=np.array([0, 1, 2] * 2), x_test=x[:3], y_test=np.array([2, 1, 0]))
    train, test = D.load_data(path, 8)
    assert test is not None and len(train) == 6 and test.labels.tolist() == [2, 1, 0]


def _bad_data(case: str, root: Path) -> Path:
    """Make the malformed data of ``case`` under ``root`` and return its path."""
    if case == "missing":
        return root
    if case == "one-class":
        return _folder(root, {"only": 2})
    if case == "empty-class":
        _folder(root, {"a": 1, "b": 1})
        (root / "c").mkdir()
        return root
    root.mkdir()
    path = root / "d.npz"
    if case == "no-y":
        np.savez(path, x=np.zeros((4, 8, 8)))
    elif case == "length":
        np.savez(path, x=np.zeros((4, 8, 8)), y=np.arange(3))
    elif case == "npz-one-class":
        np.savez(path, x=np.zeros((4, 8, 8)), y=np.zeros(4))
    elif case == "bad-x":
        np.savez(path, x=np.zeros((4, 8)), y=np.arange(4))
    elif case == "nan-x":
        np.savez(path, x=np.full((4, 8, 8), np.nan), y=np.arange(4))
    elif case == "garbage":
        path.write_bytes(b"garbage")
    elif case == "csv":
        path = root / "d.csv"
        path.write_text("1,2")
    return path


BAD_DATA = {
    "missing": "does not exist",
    "one-class": "at least 2 classes",
    "empty-class": "holds no image",
    "no-y": r"missing \['y'\]",
    "length": "one label per image",
    "npz-one-class": "at least 2 classes",
    "bad-x": "must be",
    "nan-x": "NaN",
    "garbage": "not a readable",
    "csv": "image folder",
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_with_a_clear_message(tmp_path: Path, case: str) -> None:
    path = _bad_data(case, tmp_path / "data")
    with pytest.raises((ValueError, OSError), match=BAD_DATA[case]):
        D.load_data(path, 16)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", {"a": 1, "b": 1})
    (root / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        D.load_data(root, 16)
