"""Pack suite: ``python launch/benchmark.py pack [--json FILE]``.

A folder of real photographs (random crops of the photographs scikit-learn ships, and scikit-image's
when it is installed, 256-500 px, saved as JPEG quality 90) packed into 96x96 shards, all in one run:
  (a) the peer: a plain per-image PIL loop (open, resize, centre-crop, PNG) writing per-sample
      shards with ``webdataset.ShardWriter``,
  (b) ``pack_folder`` with 1 worker (decoding in the packing process itself),
  (c) ``pack_folder`` with 2 workers (goals: c/b >= 1.8, c/a >= 1),
  (b') 1 worker with the JPEG DCT-scaled decode turned off (what ``draft`` contributes),
then the peak RSS of ``pack_folder`` (2 workers) in a fresh process for 1x and 10x the images (10 hard
links of each file; goal 10x/1x <= 1.10), and training reads through ``load_batches`` of the 10x shards
from ``http://127.0.0.1`` (``python -m http.server``) after the cache is warm versus the local folder
(goal: within 5 %; reading is the only part of a training step that differs between the two, so this is
the strictest form of that comparison). Throughput cases alternate over ``--repeats`` rounds (at most
3; (b)/(c) ``PACK_PAIRS``; the reads ``READ_ROUNDS``) and keep the median; images per CPU-second (user+sys, decoding workers
included) are reported beside img/s, since other load on the 2 cores moves wall-clock rates.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from aedist.benchmarks import Row, row
from aedist.data import remote, sources
from aedist.data.loader import load_batches
from aedist.data.pack import pack_folder
from aedist.data.shards import read_manifest

N_PHOTOS = 3000
SIZE = 96
BATCH = 256
PACK_PAIRS = 7  # --workers 1 / --workers 2 samples, alternating
READ_ROUNDS = 9  # local/URL read samples, alternating
READ_EPOCHS = 4  # epochs per read sample: ~1 s, so per-epoch jitter of a few ms does not decide the ratio

_RSS_SCRIPT = """
import resource, sys
from aedist.benchmarks import vm_hwm_mb
from aedist.data.pack import pack_folder
base = vm_hwm_mb()
m = pack_folder(sys.argv[1], sys.argv[2], size=96, workers=2)
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(sum(v.num_samples for v in m.splits.values()), vm_hwm_mb(), base, kids)
"""


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    try:  # more scenes where scikit-image is installed (its bundled photographs, no download)
        from skimage import data

        photos += [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")]
    except Exception:  # not installed, or a photo it would have to download
        pass
    return [p for p in photos if p.ndim == 3 and min(p.shape[:2]) >= 256]


def make_photo_folder(out: Path, n: int | None = None, seed: int = 0) -> Path:
    """``out/<photo name>/NNNNN.jpg``: random crops (aspect 3:4 to 4:3), longer side 256-500 px, flips."""
    from PIL import Image

    photos = _photos()
    rng = np.random.default_rng(seed)
    for i in range(n or N_PHOTOS):
        k = i % len(photos)
        p = photos[k]
        h, w = p.shape[:2]
        ch = int(rng.integers(min(h, 200), h + 1))
        cw = min(w, int(ch * rng.uniform(0.75, 1.34)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(p[top : top + ch, left : left + cw])
        scale = rng.integers(256, 501) / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        folder = out / f"photo{k}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return out


def peer_pack(src: Path, out: Path, size: int = SIZE) -> int:
    """The peer: one process, one image at a time, per-sample PNG shards through webdataset.ShardWriter."""
    import webdataset as wds
    from PIL import Image

    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((src / c).iterdir())]
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=10000, verbose=0) as sink:
        for i, (f, ci) in enumerate(files):
            img = Image.open(f).convert("RGB")
            scale = size / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            img = img.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            buf = io.BytesIO()
            img.crop((left, top, left + size, top + size)).save(buf, format="PNG")
            sink.write({"__key__": f"s{i:08d}", "png": buf.getvalue(), "cls": ci})
    return len(files)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its waited-for children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn, cpu: list[float] | None = None) -> float:
    """Items/s of ``fn()``; appends items per CPU-second to ``cpu`` (what other load on the cores cannot change)."""
    t0, c0 = time.perf_counter(), _cpu_s()
    n = fn()
    if cpu is not None:
        cpu.append(n / (_cpu_s() - c0))
    return n / (time.perf_counter() - t0)


def _ours(src: Path, out: Path, workers: int) -> int:
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines would interleave with the table
        m = pack_folder(src, out, size=SIZE, workers=workers)
    return sum(v.num_samples for v in m.splits.values())


def _no_draft(path: str | Path, size: int, channels: int = 3) -> np.ndarray:
    """load_image without the JPEG DCT-scaled decode: the full-size decode, then the same resize."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    arr = np.asarray(img.resize((size, size), Image.BILINEAR, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)))
    return arr.transpose(2, 0, 1)


def _ten_x(src: Path, dst: Path) -> None:
    """10 hard links of every file, under other names: 10x the images, no extra disk."""
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir()):
            for k in range(10):
                os.link(f, dst / d.name / f"r{k}_{f.name}")


def _rss(src: Path, out: Path) -> tuple[int, float, float, float]:
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(src), str(out)], capture_output=True, text=True, check=True)
    n, hwm, base, kids = r.stdout.split()[-4:]
    return int(n), float(hwm), float(base), float(kids)


def _serve(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder.parent)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/{folder.name}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/manifest.json", timeout=5).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("http.server did not start")


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    rounds = max(1, min(args.repeats, 3))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aedist-bench-pack-") as tmp_dir:
        tmp = Path(tmp_dir)
        src = make_photo_folder(tmp / "photos")
        sizes = [max(_image_size(f)) for f in sorted(src.rglob("*.jpg"))[:200]]
        desc = f"{N_PHOTOS} JPEGs {min(sizes)}-{max(sizes)} px -> {SIZE}x{SIZE}"
        rates: dict[str, list[float]] = {"peer": [], "w1": [], "w2": []}
        cpu: dict[str, list[float]] = {"peer": [], "w1": [], "w2": []}
        _ours(src, tmp / "warm", 2)  # page cache and imports warm for every case alike
        for _ in range(rounds):
            shutil.rmtree(tmp / "peer", ignore_errors=True)
            rates["peer"].append(_timed(lambda: peer_pack(src, tmp / "peer"), cpu["peer"]))
        for _ in range(PACK_PAIRS):  # ~2 s and ~1 s each: more samples than the 10 s peer needs
            rates["w1"].append(_timed(lambda: _ours(src, tmp / "w1", 1), cpu["w1"]))
            rates["w2"].append(_timed(lambda: _ours(src, tmp / "w2", 2), cpu["w2"]))
        peer, w1, w2 = (statistics.median(rates[k]) for k in ("peer", "w1", "w2"))
        rows.append(row("pack", f"(a) peer: PIL loop -> webdataset.ShardWriter PNG, {desc}", peer))
        rows.append(row("pack", f"(b) pack_folder --workers 1, {desc}", w1))
        rows.append(row("pack", f"(c) pack_folder --workers 2, {desc}", w2))
        for k, name in (("peer", "(a)"), ("w1", "(b)"), ("w2", "(c)")):
            rows.append(row("pack", f"{name} images per CPU-second (user+sys, workers included)", statistics.median(cpu[k])))
        load_image = sources.load_image
        sources.load_image = _no_draft
        try:
            nodraft = _timed(lambda: _ours(src, tmp / "nd", 1))
        finally:
            sources.load_image = load_image
        rows.append(row("pack", f"(b') --workers 1 without the JPEG DCT-scaled decode (1 round), {desc}", nodraft))

        _ten_x(src, tmp / "photos10")
        n1, hwm1, base1, kids1 = _rss(src, tmp / "rss1")
        n10, hwm10, base10, kids10 = _rss(tmp / "photos10", tmp / "rss10")
        rows.append(row("pack", f"peak RSS pack_folder 1x ({n1} imgs, 2 workers), packer process", 0.0, hwm1))
        rows.append(row("pack", f"peak RSS pack_folder 10x ({n10} imgs, 2 workers), packer process", 0.0, hwm10))
        rows.append(row("pack", f"  of which before packing (imports): 1x {base1:.0f} MB, 10x {base10:.0f} MB", 0.0, base10))
        rows.append(row("pack", f"  largest decoding worker (forked: shares the packer's pages): 1x {kids1:.0f} MB", 0.0, kids10))

        shards = tmp / "rss10"
        n_train = read_manifest(shards).split("train").num_samples
        server, url = _serve(shards)
        try:
            cache = tmp / "cache"
            epoch = iter(range(10**6))

            def reader(src: str | Path):
                return lambda: sum(len(y) for _, y in load_batches(src, "train", BATCH, epoch=next(epoch)))

            remote.set_cache_defaults(cache, 100.0)
            warm_t0 = time.perf_counter()
            n_warm = sum(len(y) for _, y in load_batches(url, "train", BATCH))
            cold = n_warm / (time.perf_counter() - warm_t0)
            reader(shards)()  # the local shards' sha256 is checked on their first read in a process, as the cache's was
            local_rates, url_rates, local_cpu, url_cpu = [], [], [], []
            for _ in range(READ_ROUNDS):  # alternating: other load hits both alike
                local_rates.append(_timed(lambda: sum(reader(shards)() for _ in range(READ_EPOCHS)), local_cpu))
                url_rates.append(_timed(lambda: sum(reader(url)() for _ in range(READ_EPOCHS)), url_cpu))
            local, over_http = statistics.median(local_rates), statistics.median(url_rates)
        finally:
            remote.set_cache_defaults(None, None)
            server.terminate()
            server.wait()
        rows.append(row("pack", f"read {n_train} imgs 3x96x96: http:// URL, first epoch (downloads into the cache)", cold))
        rows.append(row("pack", "read: local shards folder, load_batches", local))
        rows.append(row("pack", "read: http:// URL after the cache is warm, load_batches", over_http))
        rows.append(row("pack", "read: local shards folder, images per CPU-second", statistics.median(local_cpu)))
        rows.append(row("pack", "read: http:// URL after the cache is warm, images per CPU-second", statistics.median(url_cpu)))
    ratios = {"c/b workers 2 vs 1 (goal >= 1.8)": w2 / w1,
              f"c/b median of {PACK_PAIRS} alternating pairs": statistics.median(u / v for u, v in zip(rates["w2"], rates["w1"])),
              "c/b images per CPU-second (1.0 = no parallel overhead)": statistics.median(cpu["w2"]) / statistics.median(cpu["w1"]),
              "c/a vs peer (goal >= 1)": w2 / peer, "b/a": w1 / peer,
              "b/b' JPEG draft": w1 / nodraft, "rss 10x/1x (goal <= 1.10)": hwm10 / hwm1,
              "rss growth over imports 10x/1x": (hwm10 - base10) / max(hwm1 - base1, 1e-9),
              "url/local warm (goal >= 0.95)": over_http / local,
              f"url/local warm, median of {READ_ROUNDS} alternating pairs": statistics.median(u / v for u, v in zip(url_rates, local_rates)),
              "url/local warm, images per CPU-second": statistics.median(url_cpu) / statistics.median(local_cpu)}
    return rows, ratios
