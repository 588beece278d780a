"""Where a training epoch stands, in terms that do not depend on the world size or the batch size.

    pos = DataPosition.start("train", seed=0, epoch=3, limit=0, shuffle=True, shuffle_buffer=8192,
                             total=60000, world=8, batch_size=32)
    pos = pos.advance(10 * 32)                        # every rank consumed 10 batches of 32
    state["data_position"] = pos.to_dict()            # JSON: what a checkpoint stores
    pos = DataPosition.from_dict(state["data_position"]).relayout(world=3, batch_size=64)
    pos.rank_ranges(rank)                             # what rank 0..2 of the new world still reads

The model (pure arithmetic on a few integers; the loader turns it into reads):

- Layout 0 is the epoch's normal layout for world ``W0``: rank ``r`` owns ``span0`` samples of the
  block stream and reads them in its own shuffled order ``O_r``. The epoch's sequence is
  ``S_0 = O_0 + O_1 + … + O_{W0-1}``; the stream's last ``total - W0*span0`` samples are the
  drop_last remainder.
- Layout ``g`` splits a sequence ``S_g`` into ``W_g`` contiguous ranges of ``span_g`` samples (the tail of
  ``S_g`` beyond ``W_g*span_g`` is dropped: fewer than ``W_g`` batches or steps); each rank consumed the
  first ``consumed_g`` samples of its range (ranks advance in lockstep under DDP, so one number).
- Resuming on another world size appends layout ``g+1`` over ``S_{g+1}`` = the unconsumed ends of
  layout ``g``'s ranges, concatenated in rank order. So every sample of ``S_0`` is consumed once, still
  ahead, or in a dropped tail; never twice. Ranks of every layout own disjoint contiguous ranges, so
  reads stay disjoint, and equal spans mean every rank yields the same number of batches.
- The same world size keeps the layout (a changed batch size just cuts the ranks' remaining ranges
  into other batches), so a same-world resume is the uninterrupted stream, bit for bit; an epoch
  nothing was consumed of starts afresh in the new geometry, as do all later epochs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from aedist.errors import UserError

VERSION = 1
Interval = tuple[int, int]  # [start, stop) of positions in S_0


@dataclass(frozen=True)
class Layout:
    """One world's split of the epoch's remaining sequence."""

    world: int  # ranks
    span: int  # samples each rank owns (whole batches, or whole steps after a re-split)
    consumed: int = 0  # samples each rank has consumed from the start of its range


@dataclass(frozen=True)
class DataPosition:
    """The samples of one epoch consumed so far; JSON-able through :meth:`to_dict`."""

    split: str
    seed: int
    epoch: int
    limit: int
    shuffle: bool
    shuffle_buffer: int
    total: int  # samples of the split after ``limit`` (and skipped shards): pins the block stream
    layouts: tuple[Layout, ...]

    @classmethod
    def start(cls, split: str, *, seed: int, epoch: int, limit: int, shuffle: bool, shuffle_buffer: int,
              total: int, world: int, batch_size: int) -> DataPosition:
        """The epoch's normal layout: each rank owns ``total // (world*batch_size)`` whole batches."""
        if world < 1 or batch_size < 1:
            raise ValueError(f"bad world {world} / batch_size {batch_size}")
        span = total // (world * batch_size) * batch_size
        return cls(split, seed, epoch, limit, shuffle, shuffle_buffer, total, (Layout(world, span),))

    @property
    def world(self) -> int:
        """Ranks of the current layout."""
        return self.layouts[-1].world

    @property
    def remaining(self) -> int:
        """Samples each rank of the current layout has left."""
        last = self.layouts[-1]
        return last.span - last.consumed

    @property
    def consumed_samples(self) -> int:
        """Samples of the epoch consumed over all layouts and ranks."""
        return sum(g.world * g.consumed for g in self.layouts)

    def advance(self, samples: int) -> DataPosition:
        """The position after every rank consumed ``samples`` more of its range."""
        last = self.layouts[-1]
        if not 0 <= samples <= last.span - last.consumed:
            raise ValueError(f"cannot advance {samples} samples: {last.span - last.consumed} left per rank")
        return replace(self, layouts=(*self.layouts[:-1], replace(last, consumed=last.consumed + samples)))

    def relayout(self, world: int, batch_size: int, batches_per_step: int = 1) -> DataPosition:
        """This position for ``world`` ranks reading batches of ``batch_size``.

        Unchanged for the same world size (ranks keep their own ranges); a fresh layout if nothing of
        the epoch was consumed; else a new layout splitting what is left into ``world`` equal ranges of
        whole steps of ``batches_per_step`` batches, so every rank yields the same number of steps."""
        if world < 1 or batch_size < 1 or batches_per_step < 1:
            raise ValueError(f"bad world {world} / batch_size {batch_size} / batches_per_step {batches_per_step}")
        if self.consumed_samples == 0:
            return DataPosition.start(self.split, seed=self.seed, epoch=self.epoch, limit=self.limit, shuffle=self.shuffle,
                                      shuffle_buffer=self.shuffle_buffer, total=self.total, world=world, batch_size=batch_size)
        if world == self.world:
            return self
        unit = batch_size * batches_per_step
        span = self.world * self.remaining // (world * unit) * unit
        return replace(self, layouts=(*self.layouts, Layout(world, span)))

    def sequence(self) -> list[Interval]:
        """The current layout's sequence ``S_g`` as intervals of ``S_0``."""
        first = self.layouts[0]
        seq: list[Interval] = [(0, first.world * first.span)]
        for g in self.layouts[:-1]:
            seq = _merge([iv for r in range(g.world) for iv in _take(seq, r * g.span + g.consumed, (r + 1) * g.span)])
        return seq

    def rank_ranges(self, rank: int) -> list[tuple[int, int, int]]:
        """What ``rank`` of the current layout still reads, in order: ``(r0, start, stop)`` = positions
        ``start:stop`` of rank ``r0``'s shuffled order in layout 0."""
        last, span0 = self.layouts[-1], self.layouts[0].span
        if not 0 <= rank < last.world:
            raise ValueError(f"bad rank {rank} for world {last.world}")
        out = []
        for lo, hi in _take(self.sequence(), rank * last.span + last.consumed, (rank + 1) * last.span):
            while lo < hi:  # cut at layout 0's rank boundaries
                r0, off = divmod(lo, span0)
                stop = min(hi, (r0 + 1) * span0)
                out.append((r0, off, off + stop - lo))
                lo = stop
        return out

    def check(self, **expected: Any) -> None:
        """Raise UserError naming the first field that differs from ``expected`` (the loader's arguments)."""
        for key, want in expected.items():
            have = getattr(self, key)
            if have != want:
                raise UserError(f"the saved data position has {key}={have!r} but the loader was asked for {want!r}; "
                                f"the data or its settings changed since the checkpoint")

    def describe(self) -> str:
        """One line for the log, e.g. ``epoch 3: 2 ranks consumed 64 of 128 each; now 3 ranks x 32``."""
        parts = [f"{g.world} ranks consumed {g.consumed} of {g.span} each" for g in self.layouts]
        return f"epoch {self.epoch}: " + "; then ".join(parts) + f"; {self.remaining} left per rank"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (plain ints, strings, bools, lists)."""
        d = asdict(self)
        d["layouts"] = [asdict(g) for g in self.layouts]
        return {"version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        """Inverse of :meth:`to_dict`; a damaged record is a UserError, not a wrong epoch. Every field must
        have its type (an int is no bool, a count never negative) and the layouts must fit the epoch."""
        try:
            if not isinstance(d, dict):
                raise ValueError(f"a {type(d).__name__}, not an object")
            if d.get("version") != VERSION:
                raise ValueError(f"version {d.get('version')!r}, expected {VERSION}")
            if not isinstance(d["split"], str) or not isinstance(d["shuffle"], bool):
                raise ValueError("split must be a string and shuffle true or false")
            if not isinstance(d["layouts"], list):
                raise ValueError("layouts must be a list")
            pos = cls(d["split"], _count(d, "seed"), _count(d, "epoch"), _count(d, "limit"), d["shuffle"],
                      _count(d, "shuffle_buffer"), _count(d, "total"),
                      tuple(Layout(_count(g, "world"), _count(g, "span"), _count(g, "consumed")) for g in d["layouts"]))
            pos._validate()
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"the saved data position is damaged ({err}): {repr(d)[:200]}") from None
        return pos

    def _validate(self) -> None:
        if not self.layouts:
            raise ValueError("no layouts")
        length = self.total  # samples the next layout may split
        for g in self.layouts:
            if g.world < 1 or g.span < 0 or not 0 <= g.consumed <= g.span or g.world * g.span > length:
                raise ValueError(f"layout {g} does not fit in {length} samples")
            length = g.world * (g.span - g.consumed)


def _count(d: Any, key: str) -> int:
    """``d[key]`` as a count: an int (not a bool), >= 0; ValueError otherwise."""
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{key} is {v!r}, expected an integer >= 0")
    return v


def _take(seq: list[Interval], start: int, stop: int) -> list[Interval]:
    """Positions ``start:stop`` of the concatenation of ``seq``, as intervals."""
    out: list[Interval] = []
    offset = 0
    for lo, hi in seq:
        if offset >= stop:
            break
        a, b = max(start - offset, 0), min(stop - offset, hi - lo)
        if a < b:
            out.append((lo + a, lo + b))
        offset += hi - lo
    return out


def _merge(seq: list[Interval]) -> list[Interval]:
    """Join touching intervals, so a chain of resumes keeps as few as there are rank boundaries."""
    out: list[Interval] = []
    for lo, hi in seq:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out
