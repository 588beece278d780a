"""The streaming folder packer: same shards as the in-memory path, whatever --workers; unreadable images;
resume after kill -9; array tasks, in process and as a real SLURM array job.

    pytest tests/test_pack_stream.py                 # the SLURM test needs root and Debian's slurm packages
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aedist.data import sources
from aedist.data.loader import load_batches
from aedist.data.pack import pack_folder
from aedist.data.shards import read_manifest, write_shards
from aedist.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "ant", "dog")


def photo_folder(d: Path, per_class: int = 40, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PNGs of random pixels at exactly ``size`` (so decoding is lossless and resizing the identity).

    Returns (images [N,3,size,size], labels) in the order the packer lists them: classes sorted, names sorted.
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for ci, cls in enumerate(sorted(CLASSES)):
        (d / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            x = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(x).save(d / cls / f"{i:04d}.png")
            xs.append(x.transpose(2, 0, 1))
            ys.append(ci)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(out.glob("*.tar"))} | {"manifest.json": sha(out / "manifest.json")}


def all_samples(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*load_batches(out, split, 5, shuffle=False, drop_last=False))
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture
def cli(capsys):
    """launch/pack.py's main through run_cli, in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pack_cli", ROOT / "launch/pack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            run_cli(mod.main, list(args))
        except SystemExit as stop:
            code = stop.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return call


@pytest.mark.parametrize("classes,val", [(None, 0.2), ([2, 0], 0.25)])
def test_same_shards_as_in_memory_path_for_any_worker_count(tmp_path, classes, val):
    x, y = photo_folder(tmp_path / "photos")
    # the reference: the array path (select_classes, carve_val, write_shards) on the raw pixels
    raw = sources.RawDataset({"train": (x, y)}, sorted(CLASSES))
    if classes:
        raw = sources.select_classes(raw, classes)
    raw = sources.carve_val(raw, val, seed=3)
    write_shards(tmp_path / "ref", raw.splits, raw.classes, samples_per_block=8, blocks_per_shard=2, seed=3)
    ref = {p.name: sha(p) for p in sorted((tmp_path / "ref").glob("*.tar"))}
    digests = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        m = pack_folder(tmp_path / "photos", out, size=8, classes=classes, val_fraction=val, test_fraction=0, seed=3,
                        samples_per_block=8, blocks_per_shard=2, workers=workers)
        assert m.classes == raw.classes and m.shape == (3, 8, 8)
        digests.append(shard_digests(out))
        assert {k: v for k, v in digests[-1].items() if k != "manifest.json"} == ref
        for split, (rx, ry) in raw.splits.items():
            gx, gy = all_samples(out, split)
            assert sorted(zip(gy.tolist(), map(bytes, gx))) == sorted(zip(ry.tolist(), map(bytes, rx)))
    assert digests[0] == digests[1] == digests[2]  # manifest included: byte-identical whatever the worker count
    with tarfile.open(tmp_path / "w2" / "train-000000.tar") as tar:  # plain tar reads it
        assert tar.getnames()[:2] == ["train000000b0000.images.npy", "train000000b0000.labels.npy"]
        assert np.load(io.BytesIO(tar.extractfile(tar.getnames()[0]).read())).shape == (8, 3, 8, 8)


def test_the_packer_decodes_beside_its_helpers_in_plan_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--workers 2 = one forked helper + the packing process itself ("caller runs"): both decode, order kept."""
    from aedist.data import pack as pack_mod

    xs, _ = photo_folder(tmp_path / "photos", per_class=24)
    files = [str(f.relative_to(tmp_path / "photos")) for c in sorted(CLASSES) for f in sorted((tmp_path / "photos" / c).iterdir())]
    log, load = tmp_path / "pids", sources.load_image

    def slow_load(path: Path, size: int, channels: int = 3) -> np.ndarray:
        time.sleep(0.005)  # a helper's chunk is then never back at once: the packer has to decode too
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return load(path, size, channels)

    monkeypatch.setattr(sources, "load_image", slow_load)
    tasks = [(i, files[i : i + 4]) for i in range(0, len(files), 4)]
    got = [(task[0], imgs.copy(), bad) for task, imgs, bad in pack_mod._decoded(tasks, 2, (tmp_path / "photos", 8, 3), 4)]
    assert [t for t, _, _ in got] == [t for t, _ in tasks] and all(not bad for *_, bad in got)
    assert np.array_equal(np.concatenate([imgs for _, imgs, _ in got]), xs)
    pids = set(log.read_text().split())
    assert str(os.getpid()) in pids and len(pids) == 2, pids


def test_load_image_crops_the_centre_and_jpeg_draft_matches_full_decode(tmp_path):
    strip = np.zeros((10, 30, 3), np.uint8)
    strip[:, :10, 0], strip[:, 10:20, 1], strip[:, 20:, 2] = 255, 255, 255  # red | green | blue
    Image.fromarray(strip).save(tmp_path / "wide.png")
    got = sources.load_image(tmp_path / "wide.png", 10)
    assert got.shape == (3, 10, 10) and (got[1] == 255).all() and (got[[0, 2]] == 0).all()
    gray = sources.load_image(tmp_path / "wide.png", 5, channels=1)
    assert gray.shape == (1, 5, 5)
    # a smooth 640x480 photo-like JPEG: the DCT-scaled decode agrees with a full decode + resize
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) * 255 // 1118], -1).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "big.jpg", quality=95)
    full = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB").resize((48, 48), Image.BILINEAR, box=(80, 0, 560, 480)))
    fast = sources.load_image(tmp_path / "big.jpg", 48).transpose(1, 2, 0)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 2.0


def _bad_files(d: Path) -> list[str]:
    good = (d / "cat" / "0000.png").read_bytes()
    jpg = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(jpg, format="JPEG")
    (d / "cat" / "z_truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (d / "dog" / "z_text.png").write_text("this is not an image")
    (d / "ant" / "z_empty.jpg").write_bytes(b"")
    (d / "ant" / "notes.txt").write_text("not an image suffix: not listed at all")
    (d / "ant" / "._0001.png").write_bytes(good[:10])  # macOS resource fork: hidden, not listed
    return ["cat/z_truncated.jpg", "dog/z_text.png", "ant/z_empty.jpg"]


def test_unreadable_images_skipped_and_counted_or_exit_2(tmp_path, cli):
    x, y = photo_folder(tmp_path / "photos", per_class=10)
    bad = _bad_files(tmp_path / "photos")
    args = ["folder", "--source", str(tmp_path / "photos"), "--size", "8", "--samples-per-block", "4", "--workers", "2"]
    res = cli(*args, "--out", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    assert "skipped 3 unreadable images" in res.stderr and all(b in res.stderr for b in bad)
    m = read_manifest(tmp_path / "s")
    assert m.source["unreadable"]["count"] == 3 and sorted(m.source["unreadable"]["first"]) == sorted(bad)
    got = [(lab, bytes(img)) for split in m.splits for img, lab in zip(*all_samples(tmp_path / "s", split))]
    assert sorted(got) == sorted(zip(y.tolist(), map(bytes, x)))  # every good image with its label, nothing else
    res = cli(*args, "--out", str(tmp_path / "r"), "--on-error", "raise")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: unreadable image ") and "--on-error skip" in res.stderr
    assert any(b in res.stderr for b in bad)


def test_repack_noop_other_folder_needs_force_and_unfinished_other_pack_refused(tmp_path, cli):
    photo_folder(tmp_path / "a", per_class=6)
    photo_folder(tmp_path / "b", per_class=6, seed=1)
    out = tmp_path / "s"
    common = ["--size", "8", "--samples-per-block", "4", "--blocks-per-shard", "1", "--out", str(out)]
    assert cli("folder", "--source", str(tmp_path / "a"), *common).returncode == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = cli("folder", "--source", str(tmp_path / "a"), *common, "--workers", "2")
    assert again.returncode == 0 and "already packed" in again.stdout
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    res = cli("folder", "--source", str(tmp_path / "b"), *common)
    assert res.returncode == 2 and "--force" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # an unfinished pack of folder b (killed: no manifest) is not silently mixed with folder a
    assert cli("folder", "--source", str(tmp_path / "b"), *common, "--force").returncode == 0
    (out / "manifest.json").unlink()
    res = cli("folder", "--source", str(tmp_path / "a"), *common)
    assert res.returncode == 2 and "unfinished pack of another folder" in res.stderr
    assert cli("folder", "--source", str(tmp_path / "a"), *common, "--force").returncode == 0
    assert {p.name: sha(p) for p in out.glob("*.tar")} != {}
    # touching an image changes the listing: the folder counts as changed
    os.utime(tmp_path / "a" / "ant" / "0000.png", ns=(0, 10**9))
    assert cli("folder", "--source", str(tmp_path / "a"), *common).returncode == 2


def test_array_tasks_pack_their_own_ranges_and_the_last_writes_the_manifest(tmp_path, cli):
    photo_folder(tmp_path / "p", per_class=20)
    pack_folder(tmp_path / "p", tmp_path / "one", size=8, samples_per_block=4, blocks_per_shard=2, workers=1)
    out = tmp_path / "arr"
    common = ["folder", "--source", str(tmp_path / "p"), "--size", "8", "--samples-per-block", "4", "--blocks-per-shard", "2",
              "--out", str(out), "--task-count", "3", "--workers", "1"]
    first = cli(*common, "--task-index", "2")
    assert first.returncode == 0 and "task 2/3" in first.stdout and "still to be packed" in first.stdout
    assert not (out / "manifest.json").exists()
    n_units = len(json.loads((out / ".pack" / "plan.json").read_text())["units"])
    assert len(list(out.glob("*.tar"))) == n_units - 2 * n_units // 3  # its own range only
    assert cli(*common, "--task-index", "0").returncode == 0 and not (out / "manifest.json").exists()
    last = cli(*common, "--task-index", "1")
    assert last.returncode == 0 and "wrote" in last.stdout
    assert shard_digests(out) == shard_digests(tmp_path / "one")
    again = cli(*common, "--task-index", "1").stdout.splitlines()  # after the split line ("carved from train ...")
    assert any(line.startswith("already packed") for line in again) and not any(line.startswith("wrote") for line in again)
    bad = cli(*common, "--task-index", "3")
    assert bad.returncode == 2 and "--task-index" in bad.stderr


def test_finish_step_names_missing_shards_then_verifies_and_writes_the_manifest(tmp_path, cli):
    photo_folder(tmp_path / "p", per_class=20)
    out = tmp_path / "arr"
    base = ["folder", "--source", str(tmp_path / "p"), "--size", "8", "--samples-per-block", "4", "--blocks-per-shard", "2",
            "--out", str(out), "--workers", "1"]
    task = [*base, "--task-count", "2"]
    assert cli(*task, "--task-index", "0").returncode == 0
    early = cli(*base, "--finish")  # task 1 failed or never ran: exit 2, naming what is missing, packing nothing
    assert early.returncode == 2 and len(early.stderr.strip().splitlines()) == 1, early.stderr
    n_units = len(json.loads((out / ".pack" / "plan.json").read_text())["units"])
    assert f"{n_units - n_units // 2} of {n_units} shards" in early.stderr and "run the same pack command again" in early.stderr
    assert len(list(out.glob("*.tar"))) == n_units // 2 and not (out / "manifest.json").exists()
    # task 1 finds a damaged shard of task 0 while finishing: not its error (task 0's range is re-packed by a re-run)
    victim = out / "train-000000.tar"
    data = bytearray(victim.read_bytes())
    data[-2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    t1 = cli(*task, "--task-index", "1")
    assert t1.returncode == 0 and "train-000000.tar" in t1.stderr and "still to be packed" in t1.stdout, (t1.stdout, t1.stderr)
    assert not (out / "manifest.json").exists()
    assert cli(*base, "--finish").returncode == 2
    assert cli(*task, "--task-index", "0").returncode == 0 and (out / "manifest.json").exists()  # the re-run re-packs it
    done = cli(*base, "--finish")
    assert done.returncode == 0 and f"verified {n_units} shards" in done.stdout, done.stdout
    pack_folder(tmp_path / "p", tmp_path / "one", size=8, samples_per_block=4, blocks_per_shard=2, workers=2)
    assert shard_digests(out) == shard_digests(tmp_path / "one")
    # a shard damaged after the manifest was written: --finish refuses it, and the plain command re-packs it
    victim.write_bytes(bytes(data))
    bad = cli(*base, "--finish")
    assert bad.returncode == 2 and str(victim) in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    again = cli(*base)
    assert again.returncode == 0 and f"kept {n_units - 1} finished shards" in again.stdout, again.stdout
    assert shard_digests(out) == shard_digests(tmp_path / "one")


def test_user_mistakes_are_one_line_errors(tmp_path, cli):
    (tmp_path / "p" / "cat").mkdir(parents=True)
    (tmp_path / "p" / "cat" / "notes.txt").write_text("no images here")
    res = cli("folder", "--source", str(tmp_path / "p"), "--out", str(tmp_path / "s"))
    assert res.returncode == 2 and res.stderr.startswith("error: no images (") and len(res.stderr.strip().splitlines()) == 1
    photo_folder(tmp_path / "q", per_class=2)
    for opts, what in ((["--workers", "-1"], "--workers"), (["--task-count", "0"], "--task-count"),
                       (["--task-index", "2", "--task-count", "2"], "--task-index"), (["--samples-per-block", "0"], "--samples-per-block")):
        res = cli("folder", "--source", str(tmp_path / "q"), "--out", str(tmp_path / "t"), "--size", "8", *opts)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and what in res.stderr, (opts, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_resume_after_kill_9_keeps_finished_shards(tmp_path, cli):
    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    for cls in CLASSES:  # 160x160 noise PNGs: slow enough to decode that the pack can be caught mid-way
        (src / cls).mkdir(parents=True)
        for i in range(120):
            Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(src / cls / f"{i:04d}.png", compress_level=0)
    opts = ["--size", "16", "--samples-per-block", "4", "--blocks-per-shard", "2"]
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "launch/pack.py", "folder", "--source", str(src), "--out", str(out), *opts, "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(list((out / ".pack").glob("*.tar.json"))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0].decode()[-3000:]
            workers = _children(proc.pid) or workers
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # the packer alone, as the OOM killer would
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert workers, "never saw the decoding workers"
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() and "zombie" not in Path(f"/proc/{w}/status").read_text() for w in workers):
        assert time.monotonic() < deadline, "decoding workers outlived the killed packer"
        time.sleep(0.05)
    assert not (out / "manifest.json").exists(), "the pack finished before it was killed; make the test folder bigger"
    kept = {p.name[:-5]: (out / p.name[:-5]).stat() for p in (out / ".pack").glob("*.tar.json")}
    total = len(json.loads((out / ".pack" / "plan.json").read_text())["units"])
    assert 3 <= len(kept) < total
    # one finished shard got damaged meanwhile: the resume must notice (sha256) and re-pack it
    victim = sorted(kept)[0]
    data = bytearray((out / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / victim).write_bytes(bytes(data))
    res = cli("folder", "--source", str(src), "--out", str(out), *opts, "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert f"resuming: kept {len(kept) - 1} finished shards" in res.stdout, res.stdout
    for name, st in kept.items():
        if name != victim:  # kept, not rewritten
            assert (out / name).stat().st_ino == st.st_ino and (out / name).stat().st_mtime_ns == st.st_mtime_ns
    assert not list(out.glob(".*.tmp-*"))
    pack_folder(src, tmp_path / "ref", size=16, samples_per_block=4, blocks_per_shard=2, workers=1)
    assert shard_digests(out) == shard_digests(tmp_path / "ref")


# ----------------------------------------------------------------------------- a real SLURM array job

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    sys.path.insert(0, str(Path(__file__).parent))
    from slurm_cluster import SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.env["PATH"] = f"{Path(sys.executable).parent}:{c.env['PATH']}"
    c.env["AEDIST_PYTHON"] = sys.executable
    with c:
        yield c


def _array_states(cluster, job: str) -> list[str]:
    r = cluster._run(["scontrol", "show", "job", "-o", job])
    return [tok.split("=", 1)[1] for line in r.stdout.splitlines() for tok in line.split() if tok.startswith("JobState=")]


_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


@pytest.mark.slow
def test_slurm_array_job_packs_a_folder(cluster, tmp_path):
    photo_folder(tmp_path / "p", per_class=30)
    args = ["slurm/pack.sbatch", "folder", "--source", str(tmp_path / "p"), "--out", str(tmp_path / "arr"),
            "--size", "8", "--samples-per-block", "4", "--blocks-per-shard", "2"]
    out = tmp_path / "arr"
    job = cluster.sbatch(["--array=0-2", "--cpus-per-task=1", "--output", str(tmp_path / "pack-%A_%a.out"), *args], cwd=ROOT)
    # the final step, as slurm/pack.sbatch documents it: after every task (afterany), verify all, write the manifest if needed
    final = cluster.sbatch([f"--dependency=afterany:{job}", "--cpus-per-task=1", "--output", str(tmp_path / "finish-%j.out"),
                            *args, "--finish"], cwd=ROOT)
    deadline = time.monotonic() + 300
    while True:
        states, last = _array_states(cluster, job), _array_states(cluster, final)
        if len(states) == 3 and all(s in _ENDED for s in states) and last and last[0] in _ENDED:
            break
        assert time.monotonic() < deadline, f"array job {job} / final step {final} did not finish: {states} {last}\n{cluster.logs()}"
        time.sleep(0.5)
    logs = {i: (tmp_path / f"pack-{job}_{i}.out").read_text() for i in range(3)}
    assert states == ["COMPLETED"] * 3, (states, logs)
    for i, text in logs.items():
        assert f"--task-index {i} --task-count 3" in text and f"task {i}/3: packing" in text, text
    assert sum("wrote" in t for t in logs.values()) == 1, logs  # the last finisher wrote the manifest, once
    finish_log = (tmp_path / f"finish-{final}.out").read_text()
    n_units = len(json.loads((out / ".pack" / "plan.json").read_text())["units"])
    assert last == ["COMPLETED"] and f"verified {n_units} shards" in finish_log and "--task-index" not in finish_log, finish_log
    pack_folder(tmp_path / "p", tmp_path / "one", size=8, samples_per_block=4, blocks_per_shard=2, workers=2)
    assert shard_digests(out) == shard_digests(tmp_path / "one")
    m = read_manifest(out)
    assert sum(v.num_samples for v in m.splits.values()) == 90
    with pytest.raises(UserError):  # and the reader still checks what it reads
        (out / "train-000000.tar").write_bytes(b"x" * 10)
        list(load_batches(out, "train", 4))


def test_worker_pool_ends_in_a_process_that_handles_sigterm(tmp_path):
    """A process that trained first holds the engine's SIGTERM handler; forked decoders must not
    inherit it, or Pool.terminate() (SIGTERM) never ends them and the pack hangs at its last shard."""
    photo_folder(tmp_path / "photos")
    script = ("import signal, sys; from aedist.signals import STOP; from aedist.data.pack import pack_folder; STOP.install(); "
              "m = pack_folder(sys.argv[1], sys.argv[2], size=8, samples_per_block=8, blocks_per_shard=2, workers=2); "
              "print(m.splits['train'].num_samples)")
    try:  # subprocess.run kills the hung packer (its decoders die with it) at the timeout
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "photos"), str(tmp_path / "out")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker pool did not end within 120 s")
    assert proc.returncode == 0 and int(proc.stdout.split()[-1]) > 0, proc.stderr[-2000:]
