"""Raw readers against files written in the real formats: IDX, STL10 binary, image folders; colorize."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from aedist.data import sources
from aedist.errors import UserError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    """IDX as LeCun specifies: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian int32 dims, then data."""
    data = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def tiny_idx_dir(d: Path, gz: bool = True, n: int = (12, 5)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    for split, prefix, k in (("train", "train", n[0]), ("test", "t10k", n[1])):
        x, y = rng.integers(0, 256, (k, 6, 7), dtype=np.uint8), rng.integers(0, 10, k).astype(np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_gz_and_raw(tmp_path, gz):
    ref = tiny_idx_dir(tmp_path, gz)
    raw = sources.read_idx_dataset("mnist", tmp_path)
    assert raw.classes == [str(i) for i in range(10)] and raw.source["dataset"] == "mnist"
    for split, (x, y) in ref.items():
        gx, gy = raw.splits[split]
        assert gx.dtype == np.uint8 and gx.shape == (len(x), 1, 6, 7) and gy.dtype == np.int64
        np.testing.assert_array_equal(gx[:, 0], x)
        np.testing.assert_array_equal(gy, y)


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(UserError, match="not an IDX"):
        sources.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "t", np.zeros((3, 2, 2), np.uint8), gz=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        sources.read_idx(tmp_path / "t")
    with pytest.raises(UserError, match="--source"):
        sources.read_idx_dataset("mnist", tmp_path / "empty")


def test_stl10_binary_orientation_and_labels(tmp_path):
    d = tmp_path / "stl10_binary"
    d.mkdir()
    n = 3
    img = np.zeros((n, 3, 96, 96), np.uint8)  # [n, c, h, w] as a viewer sees it
    img[:, 0, 0, :] = 255  # red top row
    img[:, 1, :, 0] = 200  # green left column
    img[:, 2, 10, 20] = np.arange(n) + 1  # one blue dot at row 10, column 20
    # STL10 stores each channel column-major (Matlab): on disk the order is [n, c, w, h]
    (d / "train_X.bin").write_bytes(np.ascontiguousarray(img.transpose(0, 1, 3, 2)).tobytes())
    (d / "train_y.bin").write_bytes(np.array([1, 10, 5], np.uint8).tobytes())
    (d / "test_X.bin").write_bytes(np.ascontiguousarray(img[:1].transpose(0, 1, 3, 2)).tobytes())
    (d / "test_y.bin").write_bytes(np.array([2], np.uint8).tobytes())
    (d / "unlabeled_X.bin").write_bytes(np.ascontiguousarray(img[:2].transpose(0, 1, 3, 2)).tobytes())
    (d / "class_names.txt").write_text("\n".join(sources.STL10_CLASSES) + "\n")
    raw = sources.read_stl10(tmp_path, unlabeled=True)
    x, y = raw.splits["train"]
    np.testing.assert_array_equal(np.asarray(x), img)
    assert (x[:, 0, 0, :] == 255).all() and (x[:, 0, 1:, :] == 0).all() and (x[:, 1, :, 0] == 200).all()
    assert x[2, 2, 10, 20] == 3 and x[2, 2, 20, 10] == 0
    assert y.tolist() == [0, 9, 4] and raw.splits["test"][1].tolist() == [1]
    assert raw.splits["unlabeled"][1].tolist() == [-1, -1] and raw.classes[9] == "truck"
    assert "unlabeled" not in sources.read_stl10(d).splits


def test_folder_reader_resizes_and_orders_classes(tmp_path):
    from PIL import Image

    for cls, colour in (("cat", (255, 0, 0)), ("ant", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (12, 8), colour).save(tmp_path / cls / f"{i}.png")
    Image.new("RGB", (5, 5), (0, 255, 0)).save(tmp_path / "cat" / "x.jpg", quality=100)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    raw = sources.read_folder(tmp_path, size=6)
    x, y = raw.splits["train"]
    assert raw.classes == ["ant", "cat"] and x.shape == (5, 3, 6, 6) and y.tolist() == [0, 0, 1, 1, 1]
    assert (x[0, 2] == 255).all() and (x[0, :2] == 0).all()  # blue ant, channel-first
    assert (x[2, 0] == 255).all() and x[4, 1].min() > 240  # red cat, then the green jpeg upscaled


def test_colorize_is_deterministic_and_class_coloured():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 1, 5, 5), dtype=np.uint8)
    x[:, :, 0, 0] = 0
    x[:, :, 1, 1] = 255
    raw = sources.RawDataset({"train": (x, np.arange(50) % 10)}, sources.MNIST_CLASSES)
    a, b = sources.colorize(raw, seed=1), sources.colorize(raw, seed=1)
    np.testing.assert_array_equal(a.splits["train"][0], b.splits["train"][0])
    assert not np.array_equal(a.splits["train"][0], sources.colorize(raw, seed=2).splits["train"][0])
    cx = a.splits["train"][0].astype(float)
    assert cx.shape == (50, 3, 5, 5) and (cx[:, :, 0, 0] == 0).all()
    colour = cx[:, :, 1, 1] / 255  # the white pixel shows the image's colour
    for k in range(10):
        assert np.abs(colour[np.arange(50) % 10 == k] - sources.PALETTE[k]).max() <= 0.15 + 1 / 255
    assert colour[np.arange(50) % 10 == 0].std(axis=0).max() > 0.01  # jitter differs per image


def test_select_classes_and_carve_val():
    x = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
    raw = sources.RawDataset({"train": (x, np.arange(40) % 10)}, sources.FASHION_CLASSES)
    sub = sources.select_classes(raw, [1, 3, 5, 8])
    sx, sy = sub.splits["train"]
    assert sub.classes == ["Trouser", "Dress", "Sandal", "Bag"] and sorted(set(sy.tolist())) == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.array([1, 3, 5, 8])[sy], sx[:, 0, 0, 0] % 10)
    with pytest.raises(UserError):
        sources.select_classes(raw, [1, 12])
    split = sources.carve_val(sub, 0.25, seed=0)
    tx, vx = split.splits["train"][0].ravel().tolist(), split.splits["val"][0].ravel().tolist()
    assert len(vx) == 4 and sorted(tx + vx) == sorted(sx.ravel().tolist())


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    raw = sources.read_idx_dataset("fashion-mnist")
    (x, y), (xt, yt) = raw.splits["train"], raw.splits["test"]
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(yt).tolist() == [1000] * 10
    assert raw.classes[0] == "T-shirt/top" and x.max() == 255
