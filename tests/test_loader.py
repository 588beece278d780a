"""load_batches: rank split, equal counts on uneven shards, shuffle, resume position, limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aedist.data import loader
from aedist.data.loader import load_batches, num_batches
from aedist.data.shards import write_shards

N = 1000


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Uneven on purpose: 37-sample blocks, 4 per shard, a short last block and a short last shard."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (N, 1, 4, 4), dtype=np.uint8)
    write_shards(d, {"train": (x, np.arange(N))}, ["a"], samples_per_block=37, blocks_per_shard=4)
    return d, x


def labels_of(batches) -> list[int]:
    return [int(v) for _, y in batches for v in y]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_disjoint_complete_equal_counts(shards, world_size):
    d, x = shards
    bs = 16
    per_rank = [list(load_batches(d, "train", bs, r, world_size, seed=1, epoch=2)) for r in range(world_size)]
    nb = num_batches(d, "train", bs, world_size)
    assert nb == N // (world_size * bs) and all(len(b) == nb for b in per_rank)
    seen = [labels_of(b) for b in per_rank]
    flat = [v for s in seen for v in s]
    assert len(flat) == len(set(flat))  # disjoint across ranks
    assert N - len(flat) < world_size * bs  # complete up to the remainder
    for batches in per_rank:
        for images, labels in batches:
            assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.shape == (bs, 1, 4, 4)
            np.testing.assert_array_equal(images.numpy(), x[labels.numpy()])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_mode_covers_every_sample_once(shards, world_size):
    d, _ = shards
    seen = [labels_of(load_batches(d, "train", 64, r, world_size, shuffle=False, drop_last=False)) for r in range(world_size)]
    assert sorted(v for s in seen for v in s) == list(range(N))
    counts = [len(list(load_batches(d, "train", 64, r, world_size, shuffle=False, drop_last=False))) for r in range(world_size)]
    assert max(counts) == num_batches(d, "train", 64, world_size, drop_last=False)


def test_shuffle_is_seeded_by_seed_and_epoch_and_mixes_blocks(shards):
    d, _ = shards
    a = labels_of(load_batches(d, "train", 50, seed=0, epoch=0, shuffle_buffer=200))
    assert a == labels_of(load_batches(d, "train", 50, seed=0, epoch=0, shuffle_buffer=200))
    assert a != labels_of(load_batches(d, "train", 50, seed=0, epoch=1, shuffle_buffer=200))
    assert a != labels_of(load_batches(d, "train", 50, seed=1, epoch=0, shuffle_buffer=200))
    # pack order: sample ids 0..N-1 were permuted into blocks; a batch must draw from several blocks
    block_of = {int(v): i // 37 for i, v in enumerate(labels_of(load_batches(d, "train", 37, shuffle=False)))}
    assert len({block_of.get(v) for v in a[:50]}) > 2


@pytest.mark.parametrize("world_size,rank", [(1, 0), (3, 2)])
def test_resume_yields_the_rest_of_the_epoch_exactly(shards, world_size, rank, monkeypatch):
    d, _ = shards
    kw = dict(batch_size=16, rank=rank, world_size=world_size, seed=5, epoch=3, shuffle_buffer=100)
    full = list(load_batches(d, "train", **kw))
    read = []
    orig = loader._Reader.read
    monkeypatch.setattr(loader._Reader, "read", lambda self, b, s, e, *a: (read.append(e - s), orig(self, b, s, e, *a))[1])
    for k in (1, 7, len(full) - 1, len(full)):
        read.clear()
        rest = list(load_batches(d, "train", **kw, start_batch=k))
        assert len(rest) == len(full) - k
        for (x0, y0), (x1, y1) in zip(full[k:], rest):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
        # whole windows (< 100 + 37 samples each) before the position are never read
        assert sum(read) < (len(full) - k) * 16 + 137


def test_limit_uses_first_samples_of_the_split(shards):
    d, _ = shards
    first = labels_of(load_batches(d, "train", 37, shuffle=False))[:100]  # manifest order
    got = labels_of(load_batches(d, "train", 10, limit=100, seed=4))
    assert sorted(got) == sorted(first)
    assert num_batches(d, "train", 10, limit=100) == 10 == len(list(load_batches(d, "train", 10, limit=100)))


def test_batches_do_not_alias_and_cpu_pin_is_ignored(shards):
    d, x = shards
    batches = list(load_batches(d, "train", 100, pin_memory=True, device="cpu"))
    for images, labels in batches:  # held until the end: later windows must not overwrite them
        np.testing.assert_array_equal(images.numpy(), x[labels.numpy()])
        assert images.device.type == "cpu"


def test_stats_count_samples(shards):
    d, _ = shards
    stats: dict = {}
    n = sum(len(y) for _, y in load_batches(d, "train", 64, stats=stats))
    assert stats == {"skipped_shards": 0, "samples": n} and n == N // 64 * 64


def test_stream_counts_and_its_position_resumes_like_start_batch(shards):
    d, _ = shards
    kw = dict(batch_size=16, rank=1, world_size=3, seed=5, epoch=3, shuffle_buffer=100)
    stream = load_batches(d, "train", **kw)
    assert len(stream) == num_batches(d, "train", 16, 3)
    for _ in range(4):
        next(stream)
    pos = stream.position
    assert pos.remaining == (len(stream) - 4) * 16 and pos.consumed_samples == 3 * 4 * 16
    by_position = list(load_batches(d, "train", **kw, position=pos.to_dict()))
    by_index = list(load_batches(d, "train", **kw, start_batch=4))
    assert len(by_position) == len(by_index) == len(stream) - 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(by_position, by_index))
    assert load_batches(d, "train", 64, shuffle=False, drop_last=False).position is None


@pytest.mark.parametrize("world_size", [1, 2])
def test_repeat_expands_the_epoch_with_copies_shuffled_together_and_resumable(shards, world_size):
    """data.repeat: every sample R times per epoch (ids i + k*N name copy k), copies mixed across
    batches, pixels those of the raw array, and a mid-epoch position continues it exactly."""
    d, x = shards
    R, bs = 3, 20
    per_rank = [list(load_batches(d, "train", bs, r, world_size, seed=2, epoch=1, repeat=R, return_ids=True, shuffle_buffer=150))
                for r in range(world_size)]
    assert all(len(b) == num_batches(d, "train", bs, world_size, repeat=R) == R * N // (world_size * bs) for b in per_rank)
    ids = np.concatenate([i.numpy() for b in per_rank for _, _, i in b])
    labels = np.concatenate([y.numpy() for b in per_rank for _, y, _ in b])
    assert len(ids) == len(set(ids.tolist())) and ids.max() < R * N  # each copy once
    base = {int(i): int(y) for _, y, ids0 in load_batches(d, "train", 50, shuffle=False, drop_last=False, return_ids=True)
            for i, y in zip(ids0, y)}  # id -> sample (labels are the raw array's indices here)
    np.testing.assert_array_equal([base[i] for i in (ids % N).tolist()], labels)  # copy k of sample i is sample i
    counts = np.bincount(labels, minlength=N)
    assert counts.max() == R and (counts == R).sum() >= N - world_size * bs  # all R copies but the dropped remainder
    for batches in per_rank:
        for images, y, _ in batches:
            np.testing.assert_array_equal(images.numpy(), x[y.numpy()])
    first = np.concatenate([i.numpy() for _, _, i in per_rank[0][:10]])
    assert len(set((first // N).tolist())) == R  # early batches already hold every copy: shuffled together
    stream = load_batches(d, "train", bs, 0, world_size, seed=2, epoch=1, repeat=R, return_ids=True, shuffle_buffer=150)
    head = [next(stream) for _ in range(7)]
    rest = list(load_batches(d, "train", bs, 0, world_size, seed=2, epoch=1, repeat=R, return_ids=True, shuffle_buffer=150,
                             position=stream.position))
    assert [torch.equal(a[2], b[2]) for a, b in zip(head + rest, per_rank[0])] == [True] * len(per_rank[0])
    with pytest.raises(Exception, match="total"):  # a position from another repeat is refused, not silently misread
        list(load_batches(d, "train", bs, 0, world_size, seed=2, epoch=1, repeat=2, shuffle_buffer=150, position=stream.position))
