"""Stream uint8 batches from block shards to the device: rank split, seeded shuffle, resume position.

    for images, labels in load_batches("shards/fashion4", "train", 256, rank, world_size, seed, epoch):
        ...  # images uint8 [B, C, H, W], labels int64 [B], already on `device`

How an epoch is laid out (all a pure function of the manifest and the arguments, so every rank and a
resumed run compute the same thing without reading data):

1. the split's blocks in manifest order, cut at ``limit`` samples;
2. with ``shuffle``, blocks permuted by ``(seed, epoch)``; they form one stream of T samples;
3. rank r takes a contiguous range of that stream: ``[r*q, (r+1)*q)`` with ``q = T // (W*B) * B``
   under ``drop_last`` (every rank yields exactly :func:`num_batches`, so DDP never waits on a rank
   that ran dry), else ``[r*T//W, (r+1)*T//W)`` (every sample exactly once across ranks). Ranges
   cover whole blocks except at the W-1 boundaries, so ranks read disjoint data;
4. the range is cut into windows of about ``shuffle_buffer`` samples (whole blocks); with
   ``shuffle`` each window's samples are permuted by ``(seed, epoch, rank, window)``
   (:mod:`aedist.data.pieces`);
5. batches are consecutive slices of the windows.

Resuming: the returned stream's ``.position`` (:class:`aedist.data.position.DataPosition`) says which
samples of the epoch's order were consumed, independent of world and batch size; passed back as
``position=`` on any world size it yields the rest of the epoch, each sample once, split evenly over
the ranks. Windows before the position are never read, and a window cut by it is read sample-exact.

No per-sample Python: a window is read with ``readinto`` straight from the tar into one buffer and
permuted with a single gather. Peak memory is about two windows, whatever the dataset size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aedist.data import shards as S
from aedist.data.pieces import Block, Piece, PieceReader, Window, block_bases, rank_windows, slice_windows
from aedist.data.position import DataPosition
from aedist.errors import UserError

log = logging.getLogger(__name__)
# Debug hook for tests and drills: AEDIST_DUMP_IDS=DIR appends the global sample ids of every training
# batch (drop_last streams) a process yields to DIR/SPLIT-epochE-worldW-rankR-pidP.i64 (raw int64).
DUMP_ENV = "AEDIST_DUMP_IDS"


def _split_blocks(m: S.Manifest, split: str, limit: int) -> list[Block]:
    """Blocks of ``split`` in manifest order, the last one cut so at most ``limit`` samples remain."""
    out: list[Block] = []
    total = 0
    for si, shard in enumerate(m.split(split).shards):
        for bi, n in enumerate(shard.blocks):
            if limit and total + n > limit:
                n = limit - total
            if n > 0:
                out.append((si, bi, n))
                total += n
            if limit and total >= limit:
                return out
    return out


def _rank_range(total: int, batch_size: int, rank: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    if drop_last:
        q = total // (world_size * batch_size) * batch_size
        return rank * q, (rank + 1) * q
    return rank * total // world_size, (rank + 1) * total // world_size


def _repeated(blocks: list[Block], repeat: int, n_shards: int) -> list[Block]:
    """``blocks`` ``repeat`` times, copy k as virtual shard ``si + k * n_shards`` (the reader maps it
    back), so the copies are distinct stream blocks: shuffled together, and with distinct sample ids."""
    return [(si + k * n_shards, bi, n) for k in range(repeat) for si, bi, n in blocks]


def num_batches(
    shards_dir: str | Path, split: str = "train", batch_size: int = 256, world_size: int = 1, *, drop_last: bool = True, limit: int = 0,
    repeat: int = 1,
) -> int:
    """Batches each rank yields per epoch (the most any rank yields when ``drop_last`` is False)."""
    m = S.read_manifest(shards_dir)
    total = repeat * sum(n for _, _, n in _split_blocks(m, split, limit))
    if drop_last:
        return total // (world_size * batch_size)
    return max(-(-(hi - lo) // batch_size) for lo, hi in (_rank_range(total, batch_size, r, world_size, False) for r in range(world_size)))


class _Reader:
    """Reads block slices into caller buffers; checks each shard (sha256, tar index) before first use."""

    def __init__(self, m: S.Manifest, split: str, verify: bool) -> None:
        self.m, self.shards, self.verify = m, m.split(split).shards, verify
        self.files: dict[int, Any] = {}
        self.offsets: dict[int, list[tuple[int, int]]] = {}
        self.foreign: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None
        self.fetched: set[int] = set()  # a URL's shards stay pinned in the cache (not evicted) until close()
        self.sample_bytes = int(np.prod(m.shape))

    def check(self, si: int) -> None:
        """Raise UserError if shard ``si`` is missing, truncated or corrupt."""
        if si in self.offsets:
            return
        shard = self.shards[si]
        if si not in self.fetched:
            S.fetch_shard(self.m, shard)  # a URL's shard: into the local cache (m.root) on first use; no-op for a folder
            self.fetched.add(si)
        if self.m.layout == "samples":
            if not (self.m.root / shard.name).is_file():
                raise UserError(f"shard {self.m.root / shard.name} is missing")
            self.offsets[si] = []
            return
        if self.verify:
            S.verify_shard(self.m, shard)
        elif not (self.m.root / shard.name).is_file() or (self.m.root / shard.name).stat().st_size != shard.bytes:
            raise UserError(f"shard {self.m.root / shard.name} is missing or truncated; re-make it with {S.pack_command(self.m.root)} --force")
        self.offsets[si] = S.block_offsets(self.m, shard)

    def read(self, block: Block, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Copy samples ``start:stop`` of ``block`` into ``images`` [n,C,H,W] and ``labels`` [n]."""
        si, bi, _ = block
        si %= len(self.shards)  # a repeat copy's virtual shard index (see _repeated)
        self.check(si)
        if self.m.layout == "samples":
            if self.foreign is None or self.foreign[0] != si:
                self.foreign = (si, S.read_foreign(self.m, self.shards[si]))
            x, y = self.foreign[1]
            images[...], labels[...] = x[start:stop], y[start:stop]
            return
        if si not in self.files:
            self.files[si] = open(self.m.root / self.shards[si].name, "rb", buffering=0)
        fh = self.files[si]
        img_off, lab_off = self.offsets[si][bi]
        for dst, off in ((images, img_off + start * self.sample_bytes), (labels, lab_off + start * 8)):
            fh.seek(off)
            if fh.readinto(memoryview(dst).cast("B")) != dst.nbytes:
                raise UserError(f"shard {self.m.root / self.shards[si].name} is truncated; re-make it with {S.pack_command(self.m.root)} --force")

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        self.files.clear()
        for si in self.fetched:
            S.release_shard(self.m, self.shards[si])
        self.fetched.clear()


def load_batches(
    shards_dir: str | Path,
    split: str = "train",
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    device: str | torch.device = "cpu",
    *,
    start_batch: int = 0,
    position: DataPosition | dict[str, Any] | None = None,
    batches_per_step: int = 1,
    return_ids: bool = False,
    shuffle: bool = True,
    drop_last: bool = True,
    limit: int = 0,
    on_error: str = "raise",
    shuffle_buffer: int = 8192,
    pin_memory: bool = True,
    verify: bool = True,
    stats: dict[str, Any] | None = None,
    prefetch: bool = False,
    repeat: int = 1,
) -> BatchStream:
    """Yield (images uint8 [B,C,H,W], labels int64 [B]) of ``rank``'s share of one epoch on ``device``.

    ``position`` (a :class:`DataPosition` or its ``to_dict()``, from a run on any world size and batch
    size) continues that epoch where it stood; the rest is split over this world in whole steps of
    ``batches_per_step`` batches. ``start_batch=k`` is the older form: this world's layout after k
    batches. ``return_ids`` adds a third item, the samples' global ids (int64 [B] on the CPU: offsets in
    the split's manifest order). The result's ``len`` and ``.position`` are what the engine counts
    steps with and checkpoints.

    ``on_error="skip"`` checks every shard of the split up front and leaves out bad ones (counted in
    ``stats["skipped_shards"]``, with a warning), so all ranks still agree on the layout; ``"raise"``
    checks each shard on first use and raises UserError naming it. ``verify=False`` skips the sha256
    (sizes and tar structure are still checked). ``prefetch`` reads, pins and copies the next batch on
    a thread while the caller computes (on CUDA the copy runs on a side stream); the order, the
    position and the ids hook count only batches handed out, so resume is unchanged.

    ``repeat=R`` makes the epoch hold every sample R times, the copies shuffled together like distinct
    samples (a dataset expanded R-fold); copy k of sample i has id ``i + k * N`` (N = the split's
    samples in the manifest), so ``ids // N`` says which copy a row is.
    """
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"bad rank {rank} / world_size {world_size} / batch_size {batch_size}")
    if position is not None and (start_batch or not drop_last):
        raise ValueError("position works with drop_last=True and no start_batch")
    m = S.read_manifest(shards_dir)
    reader = _Reader(m, split, verify)
    stats = stats if stats is not None else {}
    stats.setdefault("skipped_shards", 0)
    stats.setdefault("samples", 0)
    blocks = _split_blocks(m, split, limit)
    if on_error == "skip":
        bad = set()
        for si in sorted({b[0] for b in blocks}):
            try:
                reader.check(si)
            except UserError as err:
                log.warning("skipping shard: %s", err)
                bad.add(si)
        stats["skipped_shards"] += len(bad)
        blocks = [b for b in blocks if b[0] not in bad]
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    n_shards = len(m.split(split).shards)
    blocks = _repeated(blocks, repeat, n_shards) if repeat > 1 else blocks
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        blocks = [blocks[i] for i in order]
    if position is not None and not isinstance(position, DataPosition):
        position = DataPosition.from_dict(position)
    pieces, count, pos = _plan(blocks, split, batch_size, rank, world_size, seed, epoch, start_batch, position, batches_per_step,
                               shuffle, drop_last, limit, shuffle_buffer)
    dev = torch.device(device)
    pin = pin_memory and dev.type == "cuda"
    dump = os.environ.get(DUMP_ENV, "") if drop_last else ""
    bases = block_bases([s.blocks for s in m.split(split).shards] * repeat) if return_ids or dump else None
    dump_path = Path(dump) / f"{split}-epoch{epoch}-world{world_size}-rank{rank}-pid{os.getpid()}.i64" if dump else None
    pieces_reader = PieceReader(reader, m.shape, seed, epoch, shuffle, pin, bases)
    gen = _iterate(reader, pieces_reader, pieces, batch_size, dev, drop_last, pin, stats, return_ids, dump_path is not None)
    return BatchStream(_Prefetcher(gen, dev) if prefetch else gen, count, batch_size, pos, dump_path)


def _plan(
    blocks: list[Block], split: str, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, start_batch: int,
    position: DataPosition | None, batches_per_step: int, shuffle: bool, drop_last: bool, limit: int, shuffle_buffer: int,
) -> tuple[list[Piece], int, DataPosition | None]:
    """What ``rank`` reads (pieces of shuffle windows, in order), how many batches that makes, and the
    epoch position it starts from (None without ``drop_last``). ``blocks`` are in stream order."""
    total = sum(b[2] for b in blocks)
    window = max(shuffle_buffer, 1) if shuffle else 1
    if not drop_last:  # evaluation: every sample once, ranks may differ by a batch
        lo, hi = _rank_range(total, batch_size, rank, world_size, False)
        skip = min(start_batch * batch_size, hi - lo)
        return slice_windows(rank_windows(blocks, lo, hi, rank, window), skip, hi - lo), -(-(hi - lo - skip) // batch_size), None
    if position is None:
        pos = DataPosition.start(split, seed=seed, epoch=epoch, limit=limit, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                                 total=total, world=world_size, batch_size=batch_size)
        pos = pos.advance(min(start_batch * batch_size, pos.remaining))
    else:
        position.check(split=split, seed=seed, epoch=epoch, limit=limit, shuffle=shuffle, shuffle_buffer=shuffle_buffer, total=total)
        pos = position.relayout(world_size, batch_size, batches_per_step)
    span0 = pos.layouts[0].span
    windows: dict[int, list[Window]] = {}  # layout-0 rank -> its windows, built once
    pieces: list[Piece] = []
    for r0, a, b in pos.rank_ranges(rank):
        if r0 not in windows:
            windows[r0] = rank_windows(blocks, r0 * span0, (r0 + 1) * span0, r0, window)
        pieces += slice_windows(windows[r0], a, b)
    return pieces, pos.remaining // batch_size, pos


class BatchStream:
    """One rank's batches of one epoch (an iterator) that knows how many it yields and where it stands.

    ``len(stream)``: batches it yields from its start, the same on every rank under ``drop_last``.
    ``stream.position``: the :class:`DataPosition` after the batches yielded so far (None without
    ``drop_last``); every yielded batch counts as consumed, so read it after the step that used them.
    """

    def __init__(self, batches: Iterator[tuple[tuple[torch.Tensor, ...], np.ndarray | None]], count: int, batch_size: int,
                 start: DataPosition | None, dump_path: Path | None = None) -> None:
        self._batches, self.count, self.batch_size, self.start = batches, count, batch_size, start
        self.yielded = 0
        self._dump = open(dump_path, "ab") if dump_path else None  # noqa: SIM115 - closed in close()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        item, ids = next(self._batches)
        if self._dump is not None:  # flushed per batch handed out: a killed process leaves what it consumed
            self._dump.write(ids.tobytes())
            self._dump.flush()
        self.yielded += 1
        return item

    def __len__(self) -> int:
        return self.count

    @property
    def position(self) -> DataPosition | None:
        return None if self.start is None else self.start.advance(self.yielded * self.batch_size)

    def close(self) -> None:
        """Close the shard files now rather than when the stream is collected."""
        self._batches.close()
        if self._dump is not None:
            self._dump.close()
            self._dump = None


class _Prefetcher:
    """One batch ahead: a thread runs the batch generator (read, pin, copy) while the caller computes.

    On CUDA the thread's copies go to a side stream; the batch handed out makes the compute stream
    wait for them and is recorded on it, so the caching allocator does not reuse its memory early.
    Exceptions (a corrupt shard) reach the caller at the batch where they happened.
    """

    _END = object()

    def __init__(self, gen: Generator[tuple[tuple[torch.Tensor, ...], np.ndarray | None], None, None], device: torch.device) -> None:
        self._gen = gen
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="aedist-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext():
                for item in self._gen:
                    ready = None
                    if self._side is not None:
                        ready = torch.cuda.Event()
                        ready.record(self._side)
                    if not self._put((item, ready)):
                        return
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the caller, raised there
            self._put(err)
        finally:
            self._gen.close()  # in the thread that ran it: closes the shard files

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> tuple[tuple[torch.Tensor, ...], np.ndarray | None]:
        got = self._queue.get()
        if got is self._END:
            self._queue.put(got)  # a later next() ends too
            raise StopIteration
        if isinstance(got, BaseException):
            raise got
        (batch, ids), ready = got
        if ready is not None:
            current = torch.cuda.current_stream()
            current.wait_event(ready)
            for t in batch:
                if t.is_cuda:
                    t.record_stream(current)
        return batch, ids

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _iterate(
    reader: _Reader, pieces_reader: PieceReader, pieces: list[Piece], batch_size: int, device: torch.device, drop_last: bool,
    pin: bool, stats: dict[str, Any], return_ids: bool, dump: bool,
) -> Generator[tuple[tuple[torch.Tensor, ...], np.ndarray | None], None, None]:
    """Cut the pieces' samples into batches (a batch may span pieces) and move them to ``device``;
    each comes with its global ids for the dump hook (None without it)."""
    carry: list[tuple[torch.Tensor, ...]] = []
    carried = 0

    def emit(parts: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], np.ndarray | None]:
        stats["samples"] += len(parts[1])
        x, y = _to_device(parts[0], parts[1], device, pin)
        return ((x, y, parts[2]) if return_ids else (x, y)), (parts[2].numpy() if dump else None)

    try:
        for win, a, b in pieces:
            x, y, ids = pieces_reader.read(win, a, b)
            n, i = b - a, 0
            while i < n:
                take = min(batch_size - carried, n - i)
                piece = (x[i : i + take], y[i : i + take]) + (() if ids is None else (ids[i : i + take],))
                i += take
                if carried == 0 and take == batch_size:
                    yield emit(piece)
                    continue
                carry.append(piece)
                carried += take
                if carried == batch_size:
                    yield emit(tuple(torch.cat(parts) for parts in zip(*carry)))
                    carry, carried = [], 0
        if carried and not drop_last:
            yield emit(tuple(torch.cat(parts) for parts in zip(*carry)))
    finally:
        reader.close()


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cpu":
        return x, y
    if pin and not x.is_pinned():
        x, y = x.pin_memory(), y.pin_memory()
    # non_blocking from pinned memory overlaps the copy with compute; the caching host allocator keeps
    # the pinned block alive until the copy's stream is done with it
    return x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
