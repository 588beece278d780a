"""Data suite: ``python launch/benchmark.py data [--json FILE]``.

Cases, all in one run on real Fashion-MNIST train (packed into a temp dir):
  (a) per-sample PNG shards through webdataset's standard pipeline (decode + batching),
  (b) our block shards through ``load_batches`` (shuffle on, batch 256),
  (c) a numpy copy of the same bytes (the memcpy ceiling),
plus 96x96x3 synthetic STL10-shaped data through ``load_batches``, and the peak RSS of a fresh process
streaming 1x versus 10x the dataset (10 hard links of the same shard: same bytes, 10x the samples).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from aedist.benchmarks import Row, median_rate, row
from aedist.data.loader import load_batches
from aedist.data.shards import MANIFEST, file_sha256, read_manifest, write_shards
from aedist.data.sources import read_idx_dataset

BATCH = 256
PNG_SAMPLES = 6000  # the per-sample path runs ~5-10k img/s: a subset keeps the suite short

_RSS_SCRIPT = """
import sys
from aedist.benchmarks import vm_hwm_mb  # VmHWM: ru_maxrss would start from the parent's peak
from aedist.data.loader import load_batches
n = sum(len(y) for _, y in load_batches(sys.argv[1], "train", 256, shuffle=True))
print(n, vm_hwm_mb())
"""


def _png_shards(out: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """Standard per-sample shards: KEY.png + KEY.cls members, as other WebDataset tools write them."""
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / "train-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=10000, verbose=0) as sink:
        for i in range(len(images)):
            buf = io.BytesIO()
            Image.fromarray(images[i, 0]).save(buf, format="PNG")
            sink.write({"__key__": f"s{i:07d}", "png": buf.getvalue(), "cls": int(labels[i])})
    return str(out / f"train-{{000000..{(len(images) - 1) // 10000:06d}}}.tar")


def _wds_rate(urls: str, repeats: int) -> float:
    import webdataset as wds

    def epoch() -> int:
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("torchl").to_tuple("png", "cls").batched(BATCH)
        return sum(len(y) for _, y in ds)

    return median_rate(epoch, repeats=max(1, min(repeats, 3)))


def _loader_rate(shards: str, repeats: int) -> float:
    epoch = iter(range(1000))
    return median_rate(lambda: sum(len(y) for _, y in load_batches(shards, "train", BATCH, epoch=next(epoch))), repeats=repeats)


def _ten_x(src: Path, dst: Path) -> None:
    """A folder whose train split is the same shard linked 10 times: 10x the samples, no extra disk."""
    dst.mkdir(parents=True, exist_ok=True)
    m = json.loads((src / MANIFEST).read_text())
    shards = m["splits"]["train"]["shards"]
    new = []
    for _ in range(10):
        for s in shards:
            name = f"train-{len(new):06d}.tar"
            os.link(src / s["name"], dst / name)
            new.append({**s, "name": name})
    m["splits"] = {"train": {"num_samples": 10 * m["splits"]["train"]["num_samples"], "shards": new}}
    (dst / MANIFEST).write_text(json.dumps(m))


def _rss(shards: Path) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(shards)], capture_output=True, text=True, check=True)
    n, mb = out.stdout.split()
    return int(n), float(mb)


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    repeats = args.repeats
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aedist-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        raw = read_idx_dataset("fashion-mnist")
        x, y = raw.splits["train"]
        if args.shards:  # read a given folder instead of packing one
            blocks = args.shards
        else:
            blocks = str(tmp / "blocks")
            write_shards(blocks, {"train": (x, y)}, raw.classes, source={"dataset": "fashion-mnist bench"})
        n_train = read_manifest(blocks).split("train").num_samples

        urls = _png_shards(tmp / "png", x[:PNG_SAMPLES], y[:PNG_SAMPLES])
        rate_a = _wds_rate(urls, repeats)
        rows.append(row("data", f"(a) webdataset per-sample PNG, {PNG_SAMPLES} imgs", rate_a))

        rate_b = _loader_rate(blocks, repeats)
        rows.append(row("data", f"(b) load_batches block shards, {n_train} imgs 1x28x28", rate_b))

        dst = np.empty_like(x)
        rate_c = median_rate(lambda: (np.copyto(dst, x), len(x))[1], repeats=repeats)
        rows.append(row("data", "(c) numpy copy of the same bytes", rate_c))

        stl = str(tmp / "stl")
        n_stl = 8192
        syn = np.random.default_rng(0).integers(0, 256, (n_stl, 3, 96, 96), dtype=np.uint8)
        write_shards(stl, {"train": (syn, np.zeros(n_stl, dtype=np.int64))}, ["x"], source={"dataset": "synthetic stl10"})
        del syn
        rate_stl = _loader_rate(stl, repeats)
        rows.append(row("data", f"load_batches synthetic 3x96x96, {n_stl} imgs (goal >= 50k)", rate_stl))

        _ten_x(Path(blocks), tmp / "ten")
        n1, rss1 = _rss(Path(blocks))
        n10, rss10 = _rss(tmp / "ten")
        rows.append(row("data", f"peak RSS streaming 1x ({n1} imgs), own process", 0.0, rss1))
        rows.append(row("data", f"peak RSS streaming 10x ({n10} imgs), own process", 0.0, rss10))
        assert file_sha256(tmp / "ten" / "train-000000.tar")  # the links read back
    ratios = {"b/a (goal >= 100)": rate_b / rate_a, "b/c": rate_b / rate_c, "rss 10x/1x (goal <= 1.10)": rss10 / rss1}
    return rows, ratios
