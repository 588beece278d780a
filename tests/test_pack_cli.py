"""launch/pack.py end to end in a subprocess: datasets, idempotency, --force, one-line errors."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aedist.data.loader import load_batches
from aedist.data.shards import read_manifest
from aedist.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pack_cli", ROOT / "launch/pack.py")
pack_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pack_cli)


@pytest.fixture
def cli(capsys):
    """Run launch/pack.py's main through run_cli in this process (a subprocess costs ~2 s of imports)."""

    def call(*args: str, main=pack_cli.main) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            run_cli(main, list(args))
        except SystemExit as stop:
            code = stop.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return call


def one_line_error(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """Tiny Fashion-MNIST-format IDX .gz files: 200 train, 40 test images of 28x28."""
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 200), ("t10k", 40)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)
        for kind, a in (("images-idx3", x), ("labels-idx1", y)):
            head = struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}i", *a.shape)
            (d / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + a.tobytes()))
        arrays[prefix] = (x, y)
    return d, *arrays["train"]


def test_pack_classes_val_idempotent_and_force(tmp_path, idx_dir, cli):
    src, x, y = idx_dir
    out = tmp_path / "f4"
    args = ["fashion-mnist", "--source", str(src), "--out", str(out), "--classes", "1,3,5,8", "--samples-per-block", "16"]
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    m = read_manifest(out)
    assert m.classes == ["Trouser", "Dress", "Sandal", "Bag"] and m.shape == (1, 28, 28)
    assert m.splits["train"].num_samples == 72 and m.splits["val"].num_samples == 8 and m.splits["test"].num_samples == 16
    got = {}
    for split in ("train", "val"):
        for images, labels in load_batches(out, split, 8, shuffle=False, drop_last=False):
            for img, lab in zip(images.numpy(), labels.tolist()):
                got[img.tobytes()] = lab
    keep = np.isin(y, [1, 3, 5, 8])
    ref = {img[None].tobytes(): [1, 3, 5, 8].index(lab) for img, lab in zip(x[keep], y[keep])}
    assert got == ref  # train + val = exactly the kept classes, remapped

    mtime = (out / "train-000000.tar").stat().st_mtime_ns
    again = cli(*args)
    assert again.returncode == 0 and "already packed" in again.stdout
    assert (out / "train-000000.tar").stat().st_mtime_ns == mtime
    one_line_error(cli(*args[:-4], "--samples-per-block", "16"), "--force")  # all classes: another dataset
    assert cli(*args[:-4], "--force").returncode == 0
    assert read_manifest(out).splits["test"].num_samples == 40


def test_colored_mnist_cli(tmp_path, idx_dir, cli):
    src, _, _ = idx_dir
    res = cli("colored-mnist", "--base", "fashion-mnist", "--source", str(src), "--out", str(tmp_path / "c"), "--val-fraction", "0")
    assert res.returncode == 0, res.stderr
    m = read_manifest(tmp_path / "c")
    assert m.shape == (3, 28, 28) and set(m.splits) == {"train", "test"} and m.source["base"] == "fashion-mnist"


def test_user_mistakes_exit_2_one_line(tmp_path, cli):
    real = subprocess.run([sys.executable, "launch/pack.py", "mnist", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT)  # the real entry script, once
    one_line_error(real, "--source")
    one_line_error(cli("stl10", "--out", str(tmp_path / "o")), "stl10_binary")
    one_line_error(cli("fashion-mnist", "--out", str(tmp_path / "o"), "--classes", "1,x"), "--classes")


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_reading_a_bad_shard_from_a_cli_exits_2_naming_it(tmp_path, idx_dir, how, cli):
    src, _, _ = idx_dir
    out = tmp_path / "s"
    assert cli("mnist", "--source", str(src), "--out", str(out), "--samples-per-block", "16").returncode == 0
    shard = out / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data = data[: len(data) - 700] if how == "truncate" else data[:5000] + bytes([data[5000] ^ 1]) + data[5001:]
    shard.write_bytes(bytes(data))
    res = cli(str(out), main=lambda a: sum(1 for _ in load_batches(a[0], batch_size=8)) and 0)
    one_line_error(res, "train-000000.tar")
