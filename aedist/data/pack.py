"""Orchestration behind ``python launch/pack.py DATASET --out shards/NAME``: read, select, split, write.

    pack("fashion-mnist", "shards/fashion4", classes=[1, 3, 5, 8])          # seed 000's four classes
    pack("folder", "shards/photos", source="photos/", size=96, workers=8)   # streaming, parallel, resumable
    pack("folder", "shards/photos", source="photos/", task_index=3, task_count=16)  # one task of an array job

Array datasets (IDX, STL10, Colored MNIST) are read into (memory-mapped) arrays and written by
:func:`aedist.data.shards.write_shards`. An image folder is streamed (:func:`pack_folder`):

1. **Plan** (a pure function of the folder listing and the options, so every worker count, every
   array task and every restart computes the same one): the sorted file list, classes kept and
   remapped, val carved and every split shuffled exactly as the in-memory path does, cut into shards
   of ``samples_per_block * blocks_per_shard`` files and blocks of ``samples_per_block``.
2. **Pack** this task's contiguous range of shards: chunks of files are decoded and resized by
   ``workers`` processes, this one among them (results come back in plan order, at most
   ``2 * workers + 2`` chunks in flight), and written block by block into ``.NAME.tmp-PID``, renamed into place when the shard is
   complete, then recorded in ``OUT/.pack/NAME.json`` with its sha256. Memory holds one block and a
   few chunks, whatever the dataset's size. Unreadable images (truncated, not an image, empty) are
   left out and counted (or stop the pack with ``on_error="raise"``).
3. **Resume**: a shard whose record, size and sha256 all agree is kept; anything else is packed
   again. A killed pack (kill -9, preemption, a node failure) is finished by running the same
   command again; no ``--force`` needed.
4. **Finish**: the task that finds every shard recorded verifies them all and writes
   ``manifest.json`` (atomically, under ``OUT/.pack.lock``, which packers also take to record a
   shard). A shard that fails to verify loses its record (a re-run re-packs it). ``finish_only``
   (``--finish``, the final step after an array job) packs nothing: it verifies every shard, writes
   the manifest if no task did, and raises UserError naming the shards still missing.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from aedist.data import sources
from aedist.data.remote import file_lock
from aedist.data.shards import MANIFEST, BlockShardWriter, Manifest, ShardInfo, SplitInfo, file_sha256, read_manifest, write_manifest, write_shards
from aedist.errors import UserError

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "mnist", "colored-mnist", "stl10", "folder")
CHUNK = 32  # images per work unit of a decode worker: small enough to balance, large enough to amortise IPC
STATE = ".pack"  # OUT/.pack/: plan.json and one record per finished shard; what a resumed pack trusts
TEST_FRACTION = 0.1  # a flat class tree has no test split; training and evaluation need one (issue 27), so carve it like val
SHOW_BAD = 5  # unreadable images named in the log; all of them are in the shard records
Unit = tuple[str, int, int, int]  # (split, shard index, first, end) over the split's planned file list


def default_workers() -> int:
    """CPUs this process may use: SLURM's --cpus-per-task inside a job, else the affinity mask."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_dataset(dataset: str, source: str | None = None, *, base: str = "mnist", size: int = 96,
                 unlabeled: bool = False, color_seed: int = 0) -> sources.RawDataset:
    """The raw dataset named on the command line (images uint8 [N,C,H,W], labels, class names)."""
    if dataset in ("fashion-mnist", "mnist"):
        return sources.read_idx_dataset(dataset, source)
    if dataset == "colored-mnist":
        return sources.colorize(sources.read_idx_dataset(base, source), seed=color_seed)
    if dataset == "stl10":
        if source is None:
            raise UserError("stl10 needs --source DIR holding stl10_binary/ (torchvision.datasets.STL10(DIR, download=True) makes it)")
        return sources.read_stl10(source, unlabeled=unlabeled)
    if dataset == "folder":
        if source is None:
            raise UserError("folder needs --source DIR with one sub-folder of images per class")
        return sources.read_folder(source, size)
    raise UserError(f"unknown dataset '{dataset}' (known: {', '.join(DATASETS)})")


def pack(
    dataset: str,
    out: str | Path,
    *,
    source: str | None = None,
    base: str = "mnist",
    classes: list[int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    size: int = 96,
    unlabeled: bool = False,
    samples_per_block: int = 1024,
    blocks_per_shard: int = 64,
    force: bool = False,
    progress: bool = True,
    workers: int | None = None,
    on_error: str = "skip",
    task_index: int = 0,
    task_count: int = 1,
    finish_only: bool = False,
) -> Manifest | None:
    """Pack ``dataset`` into ``out``: classes kept (remapped to 0..k-1), val (and, for a folder without
    a test split, test) carved from train, shuffled. The array datasets all ship a test split.

    Returns the manifest, or None for an array task that finished its shards while others still run.
    ``finish_only`` (``--finish``, the final step after an array job) packs nothing: it checks every
    shard's sha256 and writes ``manifest.json`` if no task did, or raises UserError naming what is missing.
    Every number is checked first (:func:`check_pack_args`): one line naming the option and the fix.
    """
    check_pack_args(dataset, size=size, samples_per_block=samples_per_block, blocks_per_shard=blocks_per_shard, seed=seed,
                    val_fraction=val_fraction, test_fraction=test_fraction, workers=workers, task_index=task_index, task_count=task_count)
    if dataset == "folder":
        if source is None:
            raise UserError("folder needs --source DIR with one sub-folder of images per class")
        return pack_folder(source, out, size=size, classes=classes, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                           samples_per_block=samples_per_block, blocks_per_shard=blocks_per_shard, force=force,
                           progress=progress, workers=workers, on_error=on_error, task_index=task_index, task_count=task_count,
                           finish_only=finish_only)
    if finish_only:  # arrays are written whole by one process: check what it wrote
        return verify_all(read_manifest(out))
    if task_index:  # arrays are read whole; one task writes them, the others have nothing to do
        print(f"task {task_index}/{task_count}: {dataset} is packed by task 0 alone; nothing to do")
        return None
    raw = read_dataset(dataset, source, base=base, size=size, unlabeled=unlabeled, color_seed=seed)
    if classes:
        raw = sources.select_classes(raw, classes)
    raw = sources.carve_val(raw, val_fraction, seed)
    desc: dict[str, Any] = {**raw.source, "dataset": dataset}
    if dataset == "colored-mnist":
        desc["base"] = base
    return write_shards(out, raw.splits, raw.classes, samples_per_block=samples_per_block, blocks_per_shard=blocks_per_shard,
                        seed=seed, source=desc, force=force, progress=progress)


MAX_SIZE = 4096  # image side; beyond it a block of even a few images is GiBs and no model here trains on it
MAX_BLOCK_BYTES = 2 << 30  # one tar member is read whole by every loader rank: keep a block well under the RAM of a node


def check_pack_args(dataset: str, *, size: int, samples_per_block: int, blocks_per_shard: int, seed: int, val_fraction: float,
                    workers: int | None, task_index: int, task_count: int, test_fraction: float = 0.0) -> None:
    """UserError, one line naming the option and the fix, for a number the packer cannot use (before
    anything is read or written: a size of 0 would otherwise fail deep inside numpy or mmap). ``size`` is
    only used, so only checked, for a folder; the other datasets keep their own image size."""
    if dataset == "folder" and not 4 <= size <= MAX_SIZE:
        raise UserError(f"--size {size}: the image side must be in 4..{MAX_SIZE} pixels, e.g. --size 96")
    if samples_per_block < 1 or blocks_per_shard < 1:
        raise UserError(f"--samples-per-block {samples_per_block} / --blocks-per-shard {blocks_per_shard}: both must be >= 1 "
                        "(defaults 1024 and 64)")
    if dataset == "folder" and (block := samples_per_block * 3 * size * size) > MAX_BLOCK_BYTES:
        fit = max(MAX_BLOCK_BYTES // (3 * size * size), 1)
        raise UserError(f"--samples-per-block {samples_per_block} at --size {size} makes blocks of {block / 2**30:.1f} GiB "
                        f"(at most {MAX_BLOCK_BYTES / 2**30:g}); pass --samples-per-block {fit} or less")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be >= 0")
    if not 0 <= val_fraction < 1:  # also NaN
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    _check_test_fraction(val_fraction, test_fraction)
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: must be >= 1 (or 0: the CPUs available)")
    if task_count < 1:
        raise UserError(f"--task-count {task_count}: must be >= 1 (the number of array tasks; 1 without an array)")
    if not 0 <= task_index < task_count:
        raise UserError(f"--task-index {task_index} must be in 0..{task_count - 1} (--task-count {task_count}); "
                        "with sbatch --array=0-K pass --task-count K+1")


def _check_test_fraction(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= test_fraction < 1:  # also NaN
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if val_fraction + test_fraction >= 1:  # nothing would be left to train on
        raise UserError(f"--val-fraction {val_fraction:g} + --test-fraction {test_fraction:g} must be below 1; lower one of them")


# ----------------------------------------------------------------------------- the plan

def plan_folder(listing: sources.FolderListing, classes: list[int] | None, val_fraction: float, seed: int,
                test_fraction: float = TEST_FRACTION) -> tuple[dict[str, list[tuple[str, int]]], list[str], dict[str, Any]]:
    """``{split: [(file, label)] in pack order}``, class names and the source description.

    The same selection, remapping, val carve and seeded shuffle as ``select_classes``, ``carve_val`` and
    ``write_shards`` apply to arrays, applied to the file list: a folder packs to the same shards
    either way (with no unreadable images, and ``test_fraction=0``). A tree without a test folder then
    gets ``round(n_train * test_fraction)`` of the remaining train files as test (its own seeded draw,
    so val is the same with or without it), recorded as ``test_fraction``/``test_seed`` in the manifest.
    """
    splits = dict(listing.splits)
    names = list(listing.classes)
    src: dict[str, Any] = {"dataset": "folder", "path": str(listing.root.resolve()), "listing_sha256": listing.sha256}
    if classes:
        if any(not 0 <= c < len(names) for c in classes) or len(set(classes)) != len(classes):
            raise UserError(f"--classes {','.join(map(str, classes))}: need distinct ids in 0..{len(names) - 1}")
        remap = {c: i for i, c in enumerate(classes)}
        splits = {k: [(f, remap[c]) for f, c in v if c in remap] for k, v in splits.items()}
        names, src["classes"] = [names[c] for c in classes], list(classes)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_listed = len(splits.get("train", []))
    if val_fraction and "val" not in splits and "train" in splits:
        train = splits["train"]
        perm = np.random.default_rng([seed, 1]).permutation(len(train))
        n_val = int(round(len(train) * val_fraction))
        splits["train"] = [train[i] for i in np.sort(perm[n_val:])]
        splits["val"] = [train[i] for i in np.sort(perm[:n_val])]
        src.update(val_fraction=val_fraction, val_seed=seed)
    _check_test_fraction(val_fraction if "val_fraction" in src else 0.0, test_fraction)
    if test_fraction and "test" not in splits and "train" in splits:
        n_test = int(round(n_listed * test_fraction))  # a fraction of the train files listed, as val's is
        train = splits["train"]
        perm = np.random.default_rng([seed, 2]).permutation(len(train))
        splits["train"] = [train[i] for i in np.sort(perm[n_test:])]
        splits["test"] = [train[i] for i in np.sort(perm[:n_test])]
        src.update(test_fraction=test_fraction, test_seed=seed)
    rng = np.random.default_rng(seed)
    return {k: [v[i] for i in rng.permutation(len(v))] for k, v in splits.items()}, names, src


def _units(files: dict[str, list[tuple[str, int]]], per_shard: int) -> list[Unit]:
    return [(k, s, lo, min(lo + per_shard, len(v))) for k, v in files.items() for s, lo in enumerate(range(0, len(v), per_shard))]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal plans, whatever folder path they were listed under and whatever they skipped."""
    strip = lambda d: {k: v for k, v in d.items() if k not in ("path", "unreadable")}  # noqa: E731
    return strip(a) == strip(b)


# ----------------------------------------------------------------------------- decode workers

_CTX: dict[str, Any] = {}


def _set_ctx(root: Path, size: int, channels: int) -> None:
    _CTX.update(root=root, size=size, channels=channels)


def _init_worker(root: Path, size: int, channels: int) -> None:
    _set_ctx(root, size, channels)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it terminates the pool
    # Pool.terminate() stops workers with SIGTERM: a handler inherited through fork (a training run's
    # preemption flag, in a process that trains and then packs) would make that a no-op and hang it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:  # die with the parent: a kill -9 of the packer leaves no orphaned decoders (Linux)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _decode_into(files: list[str], out: np.ndarray) -> tuple[int, list[tuple[int, str]]]:
    """Decode ``files`` into ``out[:k]`` (the readable ones, in order): (k, [(index in chunk, reason)] of the others)."""
    size, channels = _CTX["size"], _CTX["channels"]
    bad, k = [], 0
    for i, rel in enumerate(files):
        try:
            out[k] = sources.load_image(_CTX["root"] / rel, size, channels)
            k += 1
        except Exception as err:  # PIL raises many types for bad files; each is one skipped image
            bad.append((i, f"{type(err).__name__}: {err}"))
    return k, bad


def _decode_slot(files: list[str], slot: int) -> tuple[int, list[tuple[int, str]]]:
    return _decode_into(files, _CTX["slots"][slot])


class _Decoded:
    """A chunk the packing process decoded itself: the same interface as the pool's AsyncResult."""

    def __init__(self, value: tuple[int, list[tuple[int, str]]]) -> None:
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self) -> tuple[int, list[tuple[int, str]]]:
        return self.value


def _decoded(tasks: Iterable[tuple[Any, list[str]]], workers: int, ctx: tuple[Path, int, int], chunk: int
             ) -> Iterator[tuple[Any, np.ndarray, list[tuple[int, str]]]]:
    """(task, decoded images, unreadable) in task order, decoded by ``workers`` processes with bounded look-ahead.

    The packing process is one of the ``workers``: ``workers - 1`` forked helpers decode from a queue
    kept two chunks deep each, and whenever the oldest chunk is not back yet, this process decodes the
    next one itself ("caller runs") instead of waiting. So ``--workers N`` keeps N cores busy with no
    (N+1)th process (the shard writer) competing for them, and the writer's own work is balanced out.
    The images are a view valid until the next item: every decoder writes straight into slots of a
    shared anonymous mapping made before the fork (no pickling of pixels), and a slot is reused only
    once the caller has asked for the next item.
    """
    root, size, channels = ctx
    _set_ctx(*ctx)
    if workers <= 1:
        buf = np.empty((chunk, channels, size, size), dtype=np.uint8)
        for task in tasks:
            k, bad = _decode_into(task[1], buf)
            yield task, buf[:k], bad
        return
    ahead = 2 * workers + 2
    shm = mmap.mmap(-1, ahead * chunk * channels * size * size)  # MAP_SHARED: the forked helpers write into it
    _CTX["slots"] = np.frombuffer(shm, dtype=np.uint8).reshape(ahead, chunk, channels, size, size)
    # fork: the helpers need only PIL and numpy, already loaded here; spawn would re-import torch in each
    helpers = workers - 1
    pool = mp.get_context("fork").Pool(helpers, _init_worker, ctx)
    try:
        todo, free, pending = iter(tasks), list(range(ahead)), deque()
        queued, exhausted = 0, False  # chunks handed to the helpers and not yet yielded; no task left

        def take(here: bool) -> None:
            nonlocal queued, exhausted
            task = next(todo, None)
            if task is None:
                exhausted = True
                return
            slot = free.pop()
            if here:
                res: Any = _Decoded(_decode_slot(task[1], slot))
            else:
                res, queued = pool.apply_async(_decode_slot, (task[1], slot)), queued + 1
            pending.append((task, slot, res))

        while True:
            while not exhausted and free and queued < 2 * helpers:
                take(here=False)
            if not pending:
                break
            task, slot, res = pending[0]
            if not res.ready() and free and not exhausted:
                take(here=True)
                continue
            pending.popleft()
            queued -= not isinstance(res, _Decoded)
            k, bad = res.get()
            yield task, _CTX["slots"][slot][:k], bad
            free.append(slot)
    finally:
        pool.terminate()
        pool.join()
        _CTX.pop("slots", None)  # the mapping goes with the last view of it (closing it now would break a live view)


# ----------------------------------------------------------------------------- packing a folder

def pack_folder(
    source: str | Path, out: str | Path, *, size: int = 96, channels: int = 3, classes: list[int] | None = None,
    val_fraction: float = 0.1, test_fraction: float = TEST_FRACTION, seed: int = 0, samples_per_block: int = 1024,
    blocks_per_shard: int = 64, force: bool = False, progress: bool = False, workers: int | None = None, on_error: str = "skip",
    task_index: int = 0, task_count: int = 1, finish_only: bool = False,
) -> Manifest | None:
    """Stream an ImageFolder tree into block shards (see the module docstring); None if other tasks remain.

    ``finish_only``: pack nothing; verify every shard and write the manifest (see :func:`pack`).
    """
    if on_error not in ("skip", "raise"):
        raise UserError(f"--on-error must be skip or raise, got {on_error!r}")
    if samples_per_block < 1 or blocks_per_shard < 1:
        raise UserError("--samples-per-block and --blocks-per-shard must be >= 1")
    if task_count < 1:
        raise UserError(f"--task-count must be >= 1, got {task_count}")
    if not 0 <= task_index < task_count:
        raise UserError(f"--task-index {task_index} must be in 0..{task_count - 1} (--task-count {task_count})")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be >= 1 (or 0: the CPUs available), got {workers}")
    workers = workers or default_workers()
    listing = sources.list_folder(source)
    files, names, src = plan_folder(listing, classes, val_fraction, seed, test_fraction)
    if not any(files.values()):
        raise UserError(f"no images ({', '.join(sources.FOLDER_EXTS)}) in the class folders of {listing.root}")
    carved = [f"{k} {len(files[k])} (--{k}-fraction {src[f'{k}_fraction']:g})" for k in ("val", "test") if f"{k}_fraction" in src]
    if carved:  # say what was taken from train, so a user who expected all images in train sees why not
        print(f"carved from train with seed {seed}: {', '.join(carved)}; train keeps {len(files.get('train', []))}")
    src.update(size=size, channels=channels, decode=sources.DECODE_VERSION)  # a pack by an older decoder is another dataset
    settings = {"samples_per_block": samples_per_block, "blocks_per_shard": blocks_per_shard, "seed": seed}
    units = _units(files, samples_per_block * blocks_per_shard)
    plan = {"source": src, "settings": settings, "classes": names, "shape": [channels, size, size], "splits": list(files),
            "units": [[k, s, hi - lo] for k, s, lo, hi in units]}
    out = Path(out)
    done = _prepare(out, plan, force)
    if isinstance(done, Manifest):
        return verify_all(done) if finish_only else done
    if finish_only:
        return finish(out, plan, who="finish: ", strict=True)
    mine = units[task_index * len(units) // task_count : (task_index + 1) * len(units) // task_count]
    who = f"task {task_index}/{task_count}: " if task_count > 1 else ""
    kept = {_name(u): st for u in mine if (st := _finished(out, u, done))}
    todo = [u for u in mine if _name(u) not in kept]
    with file_lock(out / ".pack.lock"):  # records of shards about to be re-packed (damaged ones) are no longer true
        for u in todo:
            (out / STATE / f"{_name(u)}.json").unlink(missing_ok=True)
    n_img = sum(hi - lo for _, _, lo, hi in todo)
    if len(todo) < len(mine):
        print(f"{who}resuming: kept {len(mine) - len(todo)} finished shards of {len(mine)} (sha256 verified)")
    print(f"{who}packing {n_img} images into {len(todo)} of {len(units)} shards of {out} with {workers} workers", flush=True)
    written = _pack_units(listing.root, out, files, todo, samples_per_block, (channels, size), workers, on_error, progress, who)
    # the only task (or a re-run without an array) must end with a manifest; an array task leaves that to the last one
    return finish(out, plan, trusted={**kept, **written}, who=who, strict=task_count == 1)


def _same_plan(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    return a is not None and _same(a["source"], b["source"]) and {**a, "source": 0} == {**b, "source": 0}


def _prepare(out: Path, plan: dict[str, Any], force: bool) -> Manifest | set[str]:
    """Check what ``out`` holds against ``plan`` (under a lock): the manifest if already packed, else the
    names of shard records a resume may keep; a different dataset is refused unless ``force``."""
    out.mkdir(parents=True, exist_ok=True)
    state = out / STATE
    with file_lock(out / ".pack.lock"):
        old_plan = json.loads((state / "plan.json").read_text()) if (state / "plan.json").is_file() else None
        if (out / MANIFEST).is_file():
            old = read_manifest(out)
            same = _same(old.source, plan["source"]) and all(getattr(old, k) == v for k, v in plan["settings"].items())
            if same and all((out / s.name).is_file() and (out / s.name).stat().st_size == s.bytes for sp in old.splits.values() for s in sp.shards):
                print(f"already packed: {out} ({', '.join(f'{k} {v.num_samples}' for k, v in old.splits.items())})")
                return old
            if not same and not force:
                raise UserError(f"{out} already holds a different dataset or packing ({old.source.get('dataset', '?')}); "
                                "pass --force to overwrite it, or choose another --out")
            (out / MANIFEST).unlink()  # same plan with a damaged shard: the resume below re-packs it
        elif old_plan is not None and not _same_plan(old_plan, plan) and not force:
            raise UserError(f"{out} holds an unfinished pack of another folder or with other options; "
                            "pass --force to start over, or choose another --out")
        elif old_plan is None and any(out.glob("*.tar")) and not force:
            raise UserError(f"{out} holds .tar files but no {MANIFEST}; pass --force to overwrite them, or choose another --out")
        if not _same_plan(old_plan, plan):  # a new pack (or --force): nothing of the old folder may survive
            for stale in [out / MANIFEST, *out.glob("*.tar"), *state.glob("*.json")]:
                stale.unlink(missing_ok=True)
            state.mkdir(exist_ok=True)
            _write_json(state / "plan.json", plan)
    return {p.name[: -len(".json")] for p in state.glob("*.tar.json")}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _name(unit: Unit) -> str:
    return f"{unit[0]}-{unit[1]:06d}.tar"


def _record(out: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((out / STATE / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _finished(out: Path, unit: Unit, recorded: set[str]) -> tuple[int, int] | None:
    """(size, mtime_ns) of a shard a resume keeps: recorded, with the recorded size and sha256; else None."""
    name = _name(unit)
    rec = _record(out, name) if name in recorded else None
    path = out / name
    st = path.stat() if rec is not None and path.is_file() else None
    if st is None or st.st_size != rec["shard"]["bytes"] or file_sha256(path) != rec["shard"]["sha256"]:
        return None
    return st.st_size, st.st_mtime_ns


def _pack_units(root: Path, out: Path, files: dict[str, list[tuple[str, int]]], units: list[Unit], spb: int,
                shape: tuple[int, int], workers: int, on_error: str, progress: bool, who: str) -> dict[str, tuple[int, int]]:
    """Write ``units``; returns {shard name: (size, mtime_ns)} of what this process wrote (and so trusts)."""
    for unit in units:  # leftovers of a killed attempt at these shards (other tasks' shards are theirs)
        for tmp in out.glob(f".{_name(unit)}.tmp-*"):
            tmp.unlink(missing_ok=True)
    channels, size = shape
    chunk = min(CHUNK, spb)
    tasks = (((ui, b, [lab for _, lab in files[k][c:min(c + chunk, blo + spb, hi)]]), [f for f, _ in files[k][c:min(c + chunk, blo + spb, hi)]])
             for ui, (k, _, lo, hi) in enumerate(units) for b, blo in enumerate(range(lo, hi, spb)) for c in range(blo, min(blo + spb, hi), chunk))
    images = np.empty((spb, channels, size, size), dtype=np.uint8)
    labels = np.empty(spb, dtype=np.int64)
    bar, t0, n_done = None, time.monotonic(), 0
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=sum(hi - lo for *_, lo, hi in units), unit="img", desc=f"{who}pack {out.name}")
    written: dict[str, tuple[int, int]] = {}
    writer: BlockShardWriter | None = None
    cur, n, unreadable = (-1, -1), 0, []

    def flush() -> None:
        nonlocal n
        if n:
            k, s = units[cur[0]][:2]
            writer.add_block(f"{k}{s:06d}b{len(writer.blocks):04d}", images[:n], labels[:n])
        n = 0

    def close() -> None:
        flush()
        with file_lock(out / ".pack.lock"):  # shard and record change together, never while a finisher verifies
            info = writer.close()
            st = (out / info.name).stat()
            written[info.name] = (st.st_size, st.st_mtime_ns)
            _write_json(out / STATE / f"{info.name}.json", {"shard": asdict(info), "unreadable": unreadable})
        if progress and bar is None:  # logs (SLURM, CI): one line per shard instead of a redrawn bar
            print(f"{who}{info.name}: {info.num_samples} images, {len(unreadable)} unreadable; {len(written)}/{len(units)} shards, "
                  f"{n_done / (time.monotonic() - t0):.0f} img/s", flush=True)

    try:
        for ((ui, b, labs), rels), imgs, bad in _decoded(tasks, workers, (root, size, channels), chunk):
            if (ui, b) != cur:
                if ui != cur[0]:
                    if writer is not None:
                        close()
                    writer, unreadable = BlockShardWriter(out / _name(units[ui])), []
                flush()
                cur = (ui, b)
            for i, reason in bad:
                if on_error == "raise":
                    raise UserError(f"unreadable image {root / rels[i]} ({reason}); pass --on-error skip to leave such images out")
                unreadable.append([rels[i], reason])
            ok = np.delete(np.asarray(labs, dtype=np.int64), [i for i, _ in bad])
            images[n : n + len(ok)], labels[n : n + len(ok)] = imgs, ok
            n += len(ok)
            n_done += len(labs)
            if bar is not None:
                bar.update(len(labs))
        if writer is not None:
            close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        if bar is not None:
            bar.close()
    return written


def finish(out: str | Path, plan: dict[str, Any] | None = None, *, trusted: dict[str, tuple[int, int]] | None = None,
           who: str = "", strict: bool = False) -> Manifest | None:
    """Write ``manifest.json`` once every shard of the plan is recorded and verifies.

    While some are not, returns None (an array task: the others are still packing them), or with
    ``strict`` (the only task, the final ``--finish`` step) raises UserError naming them. A recorded
    shard that does not verify loses its record, so that running the pack again re-packs it. Shards in
    ``trusted`` ({name: (size, mtime_ns)}, what this process wrote) are not hashed again.
    """
    out = Path(out)
    plan = plan or json.loads((out / STATE / "plan.json").read_text())
    names = [_name((k, s, 0, 0)) for k, s, _ in plan["units"]]
    if strict or all((out / STATE / f"{n}.json").is_file() for n in names):
        with file_lock(out / ".pack.lock"):  # packers record shards under this lock: what we read stays true while we check
            if (out / MANIFEST).is_file():  # another finisher was first
                return read_manifest(out)
            records = {n: _record(out, n) for n in names}
            bad = []
            for name, rec in records.items():
                path = out / name
                st = path.stat() if rec is not None and path.is_file() else None
                if rec is not None and (st is None or st.st_size != rec["shard"]["bytes"] or (
                        (trusted or {}).get(name) != (st.st_size, st.st_mtime_ns) and file_sha256(path) != rec["shard"]["sha256"])):
                    (out / STATE / f"{name}.json").unlink(missing_ok=True)  # so that running the pack again re-packs it
                    records[name] = None
                    bad.append(name)
            missing = [n for n, rec in records.items() if rec is None]
            if not missing:
                return _write_final(out, plan, records, who)
    else:
        bad, missing = [], [n for n in names if not (out / STATE / f"{n}.json").is_file()]
    if bad:
        print(f"{who}warning: {len(bad)} packed shards are missing or corrupt (size or sha256 differs from their record): "
              f"{', '.join(bad[:SHOW_BAD])}{' …' if len(bad) > SHOW_BAD else ''}; they will be re-packed", file=sys.stderr)
    if strict:
        raise UserError(f"{len(missing)} of {len(names)} shards of {out} are not packed ({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}): "
                        "an array task failed, or a shard was damaged; run the same pack command again (array or not: finished shards are kept)")
    print(f"{who}done; {len(missing)} of {len(names)} shards are still to be packed by other tasks "
          f"(the last one writes {out / MANIFEST})")
    return None


def _write_final(out: Path, plan: dict[str, Any], records: dict[str, Any], who: str) -> Manifest:
    """The manifest from the plan and every shard's record (called under the pack lock, all shards verified)."""
    splits = {k: SplitInfo(0, []) for k in plan["splits"]}
    for (k, *_), rec in zip(plan["units"], records.values()):
        sp = splits[k]
        sp.shards.append(ShardInfo(**rec["shard"]))
        sp.num_samples += rec["shard"]["num_samples"]
    bad = [item for rec in records.values() for item in rec["unreadable"]]
    src = dict(plan["source"])
    if bad:
        src["unreadable"] = {"count": len(bad), "first": [f for f, _ in bad[:SHOW_BAD]]}
        shown = "; ".join(f"{f} ({r})" for f, r in bad[:SHOW_BAD])
        print(f"warning: skipped {len(bad)} unreadable images: {shown}{' …' if len(bad) > SHOW_BAD else ''} "
              f"(all are listed in {out / STATE}/*.json)", file=sys.stderr)
    m = Manifest(tuple(plan["shape"]), list(plan["classes"]), splits, src, root=out, **plan["settings"])
    write_manifest(out, m)
    print(f"{who}wrote {out / MANIFEST}: {', '.join(f'{k} {v.num_samples}' for k, v in splits.items())}")
    return m


def verify_all(m: Manifest) -> Manifest:
    """Check every shard of ``m`` against its size and sha256 (the final step of an array job); UserError if one differs."""
    shards = [s for sp in m.splits.values() for s in sp.shards]
    for s in shards:
        path = m.root / s.name
        if not path.is_file() or path.stat().st_size != s.bytes or (s.sha256 and file_sha256(path) != s.sha256):
            if not (m.root / STATE / "plan.json").is_file():  # written whole by write_shards: nothing to resume
                raise UserError(f"shard {path} is missing or corrupt (size or sha256 differs from {m.root / MANIFEST}); "
                                "re-make the folder with the same pack command and --force")
            with file_lock(m.root / ".pack.lock"):  # a streamed pack: drop the record and the manifest, a re-run re-packs it
                (m.root / STATE / f"{s.name}.json").unlink(missing_ok=True)
                (m.root / MANIFEST).unlink(missing_ok=True)
            raise UserError(f"shard {path} is missing or corrupt (size or sha256 differs from its manifest); "
                            "run the same pack command again (without --finish) to re-pack it")
    print(f"verified {len(shards)} shards of {m.root} (size and sha256): {', '.join(f'{k} {v.num_samples}' for k, v in m.splits.items())}")
    return m
