"""Shuffle windows and reading any slice of one in its shuffled order, for the loader.

A rank's range of the block stream is cut into windows of about ``shuffle_buffer`` samples (whole
blocks but at the range's ends); a window's samples are permuted by ``(seed, epoch, rank, index)``.
The loader yields pieces ``(window, a, b)``: positions ``a:b`` of a window's permuted order. A whole
window is read in stream order and permuted with one gather; a part of one (where a resume or another
world's rank boundary cuts it) is read as the sorted runs of exactly its samples, so two ranks sharing
a window never read each other's samples. Only those cut windows loop over runs in Python.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np
import torch

Block = tuple[int, int, int]  # (shard index, block index in shard, samples used)
Segment = tuple[Block, int, int]  # samples start:stop of a block


class Window(NamedTuple):
    """Consecutive stream samples shuffled together."""

    segments: list[Segment]
    rank: int  # layout-0 rank whose order holds it: with ``nth`` it seeds the permutation
    nth: int  # its place among that rank's windows
    size: int


Piece = tuple[Window, int, int]  # positions a:b of the window's (permuted) order


class BlockReader(Protocol):
    def read(self, block: Block, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None: ...


def rank_windows(blocks: list[Block], lo: int, hi: int, rank: int, window: int) -> list[Window]:
    """Windows of stream samples ``lo:hi`` (``blocks`` in stream order), each at least ``window`` samples
    of whole segments but the last."""
    sizes = np.array([b[2] for b in blocks], dtype=np.int64)
    ends = np.cumsum(sizes)
    out: list[list[Segment]] = []
    count = window  # forces a new window first
    for i in range(int(np.searchsorted(ends, lo, side="right")), len(blocks)):
        b_start = int(ends[i] - sizes[i])
        if b_start >= hi:
            break
        seg = (blocks[i], max(lo, b_start) - b_start, min(hi, int(ends[i])) - b_start)
        if count >= window:
            out.append([])
            count = 0
        out[-1].append(seg)
        count += seg[2] - seg[1]
    return [Window(segs, rank, i, sum(s[2] - s[1] for s in segs)) for i, segs in enumerate(out)]


def slice_windows(windows: list[Window], start: int, stop: int) -> list[Piece]:
    """Positions ``start:stop`` of the windows' concatenated order, as pieces."""
    out: list[Piece] = []
    offset = 0
    for win in windows:
        if offset >= stop:
            break
        a, b = max(start - offset, 0), min(stop - offset, win.size)
        if a < b:
            out.append((win, a, b))
        offset += win.size
    return out


def block_bases(blocks_per_shard: list[list[int]]) -> dict[tuple[int, int], int]:
    """Global sample id of each block's first sample: its offset in the split's manifest order, so ids
    name the same sample whatever the world, limit or shuffle."""
    out, total = {}, 0
    for si, blocks in enumerate(blocks_per_shard):
        for bi, n in enumerate(blocks):
            out[(si, bi)] = total
            total += n
    return out


class PieceReader:
    """Reads pieces into fresh tensors in yield order, reusing one scratch buffer for the gathers."""

    def __init__(self, reader: BlockReader, shape: tuple[int, int, int], seed: int, epoch: int, shuffle: bool, pin: bool,
                 bases: dict[tuple[int, int], int] | None) -> None:
        self.reader, self.shape, self.seed, self.epoch, self.shuffle, self.pin = reader, shape, seed, epoch, shuffle, pin
        self.bases = bases  # None: no sample ids wanted
        self.scratch = np.empty(0, dtype=np.uint8)

    def read(self, win: Window, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images uint8 [b-a,C,H,W], labels int64 [b-a], global ids int64 [b-a] or None)."""
        n, m = win.size, b - a
        pos: np.ndarray | None  # sorted window positions to read; None = all of them
        inv: np.ndarray | None  # row i of the piece is row inv[i] of what was read; None = as read
        if not (self.shuffle and n > 1):
            pos, inv = (None if m == n else np.arange(a, b)), None
        else:
            perm = np.random.default_rng([self.seed, self.epoch, win.rank, win.nth]).permutation(n)
            if m == n:  # the whole window: read in stream order, one gather
                pos, inv = None, perm
            else:
                sel = perm[a:b]
                order = np.argsort(sel)
                pos, inv = sel[order], np.empty(m, dtype=np.int64)
                inv[order] = np.arange(m)
        c, h, w = self.shape
        if inv is None:  # read straight into the batch memory
            x = torch.empty((m, c, h, w), dtype=torch.uint8, pin_memory=self.pin)
            y = torch.empty((m,), dtype=torch.int64, pin_memory=self.pin)
            sx, sy = x.numpy(), y.numpy()
        else:  # read into the reused scratch, then one gather into fresh memory
            if self.scratch.size < m * c * h * w:
                self.scratch = np.empty(m * c * h * w, dtype=np.uint8)
            sx, sy = self.scratch[: m * c * h * w].reshape(m, c, h, w), np.empty(m, dtype=np.int64)
        k = 0
        for block, start, stop in _runs(win, pos):
            self.reader.read(block, start, stop, sx[k : k + stop - start], sy[k : k + stop - start])
            k += stop - start
        if inv is not None:
            if self.pin:
                x = torch.empty((m, c, h, w), dtype=torch.uint8, pin_memory=True)
                torch.index_select(torch.from_numpy(sx), 0, torch.from_numpy(inv), out=x)
                y = torch.from_numpy(sy[inv]).pin_memory()
            else:  # numpy fancy indexing of whole rows: measured 2-4x faster than np.take(out=) here
                x, y = torch.from_numpy(sx[inv]), torch.from_numpy(sy[inv])
        ids = None
        if self.bases is not None:
            read_ids = self._ids(win, pos)
            ids = torch.from_numpy(read_ids if inv is None else read_ids[inv])
        return x, y, ids

    def _ids(self, win: Window, pos: np.ndarray | None) -> np.ndarray:
        assert self.bases is not None
        seg_ends, seg_starts = _seg_bounds(win)
        pos = np.arange(win.size, dtype=np.int64) if pos is None else pos
        seg = np.searchsorted(seg_ends, pos, side="right")
        base = np.array([self.bases[(blk[0], blk[1])] + start for blk, start, _ in win.segments], dtype=np.int64) - seg_starts
        return base[seg] + pos


def _seg_bounds(win: Window) -> tuple[np.ndarray, np.ndarray]:
    """Window positions where each segment ends and starts."""
    ends = np.cumsum(np.array([stop - start for _, start, stop in win.segments], dtype=np.int64))
    return ends, ends - np.array([stop - start for _, start, stop in win.segments], dtype=np.int64)


def _runs(win: Window, pos: np.ndarray | None) -> list[Segment]:
    """Reads covering the sorted window positions ``pos`` (None = all) in order: maximal runs of
    consecutive positions within one segment."""
    if pos is None:
        return win.segments
    if pos.size == 0:
        return []
    seg_ends, seg_starts = _seg_bounds(win)
    seg = np.searchsorted(seg_ends, pos, side="right")
    cut = np.flatnonzero((np.diff(pos) != 1) | (np.diff(seg) != 0)) + 1
    firsts, lasts = np.concatenate(([0], cut)), np.concatenate((cut, [pos.size]))
    out: list[Segment] = []
    for i, j in zip(firsts.tolist(), lasts.tolist()):
        k = int(seg[i])
        block, b0, _ = win.segments[k]
        start = b0 + int(pos[i] - seg_starts[k])
        out.append((block, start, start + j - i))
    return out
