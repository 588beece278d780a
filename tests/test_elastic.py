"""Elastic resume of the loader: an epoch interrupted on one world size or batch geometry continues on
another with every sample used once (up to the drop_last remainders), ranks reading disjoint data and
yielding equal counts. Ranks are simulated in-process: one load_batches call per rank."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from aedist.data import DataPosition, load_batches, read_manifest
from aedist.data import loader as L
from aedist.data.pieces import block_bases
from aedist.data.shards import write_shards
from aedist.errors import UserError

N, SEED, EPOCH, BUF = 1000, 7, 2, 100  # 32-sample blocks, windows of 4 blocks: ranks and resumes cut both


IMAGES = np.random.default_rng(0).integers(0, 256, (N, 1, 4, 4), dtype=np.uint8)
LABEL_OF_ID: dict[Path, np.ndarray] = {}  # shards -> label (= row of IMAGES) of each global sample id


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("elastic")
    write_shards(d, {"train": (IMAGES, np.arange(N))}, ["a"], samples_per_block=32, blocks_per_shard=4)
    LABEL_OF_ID[d] = np.concatenate([y.numpy() for _, y in load_batches(d, "train", 50, shuffle=False, drop_last=False)])
    return d


class Reads:
    """Global ids of the samples each simulated rank read from disk (through _Reader.read)."""

    def __init__(self, shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        m = read_manifest(shards)
        self.bases = block_bases([s.blocks for s in m.split("train").shards])
        self.by_rank: dict[int, list[np.ndarray]] = {}
        self.rank = 0
        orig = L._Reader.read

        def read(reader: L._Reader, block: tuple[int, int, int], start: int, stop: int, *rest: np.ndarray) -> None:
            self.by_rank.setdefault(self.rank, []).append(self.bases[block[:2]] + np.arange(start, stop))
            orig(reader, block, start, stop, *rest)

        monkeypatch.setattr(L._Reader, "read", read)

    def take(self) -> list[np.ndarray]:
        out = [np.concatenate(self.by_rank.get(r, [np.empty(0, np.int64)])) for r in range(max(self.by_rank, default=-1) + 1)]
        self.by_rank.clear()
        return out


def run(shards: Path, world: int, batch: int, position: dict | None, steps: int | None, accum: int = 1,
        reads: Reads | None = None) -> tuple[list[np.ndarray], dict]:
    """Every rank does ``steps`` optimizer steps of ``accum`` micro-batches (None: all it has); returns
    each rank's consumed ids and the checkpointed position after a JSON round trip."""
    ids, positions, counts = [], [], []
    for r in range(world):
        if reads is not None:
            reads.rank = r
        stream = load_batches(shards, "train", batch, r, world, SEED, EPOCH, position=position, batches_per_step=accum,
                              return_ids=True, shuffle_buffer=BUF)
        counts.append(len(stream))
        n = len(stream) // accum * accum if steps is None else steps * accum
        got = [next(stream) for _ in range(n)]
        for images, labels, sample_ids in got:  # the ids name the very samples yielded
            assert images.shape[0] == batch
            assert np.array_equal(LABEL_OF_ID[shards][sample_ids.numpy()], labels.numpy())
            assert np.array_equal(IMAGES[labels.numpy()], images.numpy())
        ids.append(np.concatenate([g[2].numpy() for g in got]) if got else np.empty(0, np.int64))
        assert stream.position is not None
        positions.append(stream.position.to_dict())
        stream.close()
    assert len(set(counts)) == 1, counts  # DDP never waits on a rank that ran dry
    assert all(p == positions[0] for p in positions)  # ranks agree on what to checkpoint
    return ids, json.loads(json.dumps(positions[0]))


def assert_exactly_once(stages: list[list[np.ndarray]], allowed_missing: int) -> None:
    used = np.concatenate([i for stage in stages for i in stage])
    assert len(np.unique(used)) == len(used), "a sample was used twice"
    assert used.min() >= 0 and used.max() < N
    assert 0 <= N - len(used) < allowed_missing, (N - len(used), allowed_missing)


def test_ids_name_the_samples(shards: Path) -> None:
    order = [(x, y, i) for x, y, i in load_batches(shards, "train", 50, shuffle=False, drop_last=False, return_ids=True)]
    ids = np.concatenate([i.numpy() for *_, i in order])
    assert ids.tolist() == list(range(N))  # manifest order
    label_of = np.concatenate([y.numpy() for _, y, _ in order])
    image_of = np.concatenate([x.numpy() for x, _, _ in order])
    for x, y, i in load_batches(shards, "train", 16, 1, 3, SEED, EPOCH, return_ids=True, shuffle_buffer=BUF):
        assert np.array_equal(label_of[i.numpy()], y.numpy()) and np.array_equal(image_of[i.numpy()], x.numpy())


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_world_change_uses_every_sample_once(shards: Path, old: int, new: int, monkeypatch: pytest.MonkeyPatch) -> None:
    glob = 24  # global batch: per-rank 24 / 12 / 8
    reads = Reads(shards, monkeypatch)
    before, pos = run(shards, old, glob // old, None, steps=7)
    reads.take()
    after, end = run(shards, new, glob // new, pos, steps=None, reads=reads)
    assert len(end["layouts"]) == 2 and end["layouts"][-1]["world"] == new
    assert_exactly_once([before, after], N % glob + glob)
    done = set(np.concatenate(before).tolist())
    read = reads.take()
    for r, got in enumerate(read):
        assert not done & set(got.tolist()), "a resumed rank re-read consumed samples"
        for other in read[r + 1 :]:
            assert not set(got.tolist()) & set(other.tolist()), "two ranks read the same sample"
    # The rest of the same shuffled order, not a new one: old ranks' unconsumed orders, concatenated.
    full, _ = run(shards, old, glob // old, None, steps=None)
    rest = np.concatenate([f[7 * glob // old :] for f in full])
    assert np.array_equal(np.concatenate(after), rest[: sum(len(a) for a in after)])


def test_same_world_resume_is_the_uninterrupted_stream(shards: Path) -> None:
    full, _ = run(shards, 3, 8, None, steps=None)
    before, pos = run(shards, 3, 8, None, steps=5)
    after, end = run(shards, 3, 8, pos, steps=None)
    assert len(end["layouts"]) == 1
    for f, b, a in zip(full, before, after):
        assert np.array_equal(f, np.concatenate([b, a]))


def test_global_batch_change(shards: Path) -> None:
    before, pos = run(shards, 2, 12, None, steps=9)  # global batch 24
    mid, pos = run(shards, 2, 20, pos, steps=4)  # global 40 on the same world: ranks keep their ranges
    after, _ = run(shards, 3, 16, pos, steps=None)  # global 48 on 3 ranks
    assert_exactly_once([before, mid, after], N % 24 + 2 * 20 + 48)


@pytest.mark.parametrize("new_world", [2, 3])
def test_grad_accum_change_keeps_the_sample_position(shards: Path, new_world: int) -> None:
    # Global batch 24 throughout: 2 ranks x 12 x accum 1, then new_world ranks x (24/new_world/2) x accum 2.
    before, pos = run(shards, 2, 12, None, steps=6)
    micro = 24 // new_world // 2
    stream = load_batches(shards, "train", micro, 0, new_world, SEED, EPOCH, position=pos, batches_per_step=2, shuffle_buffer=BUF)
    if new_world != 2:
        assert len(stream) % 2 == 0  # a re-split hands out whole optimizer steps
    after, _ = run(shards, new_world, micro, pos, steps=None, accum=2)
    assert_exactly_once([before, after], N % 24 + 24)


def test_double_resume_in_one_epoch(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = Reads(shards, monkeypatch)
    a, pos = run(shards, 2, 16, None, steps=5)
    b, pos = run(shards, 3, 8, pos, steps=11)
    assert [g["world"] for g in pos["layouts"]] == [2, 3]
    reads.take()
    c, end = run(shards, 1, 40, pos, steps=None, reads=reads)
    assert [g["world"] for g in end["layouts"]] == [2, 3, 1]
    assert_exactly_once([a, b, c], N % 32 + 24 + 40)
    assert not set(np.concatenate(reads.take()).tolist()) & set(np.concatenate(a + b).tolist())


def test_untouched_epoch_and_next_epochs_use_the_new_worlds_layout(shards: Path) -> None:
    _, pos = run(shards, 2, 12, None, steps=0)
    resumed, _ = run(shards, 3, 8, pos, steps=None)
    fresh, _ = run(shards, 3, 8, None, steps=None)
    assert all(np.array_equal(x, y) for x, y in zip(resumed, fresh))


def test_position_chains_and_round_trips() -> None:
    pos = DataPosition.start("train", seed=1, epoch=0, limit=0, shuffle=True, shuffle_buffer=8, total=103, world=2, batch_size=10)
    assert pos.layouts[0].span == 50 and pos.remaining == 50
    pos = pos.advance(20).relayout(3, 4, batches_per_step=2)
    assert pos.layouts[-1].span == 2 * 30 // 24 * 8 == 16
    # S_1 = S_0[20:50] + S_0[70:100] (the ends of layout 0's ranks), cut into 3 x 16; S_1[48:] is dropped
    assert [pos.rank_ranges(r) for r in range(3)] == [[(0, 20, 36)], [(0, 36, 50), (1, 20, 22)], [(1, 22, 38)]]
    pos = pos.advance(8).relayout(1, 5)
    # S_2 = S_0[28:36] + S_0[44:50] + S_0[70:72] + S_0[80:88]: 24 samples, 20 of them in whole batches
    assert pos.rank_ranges(0) == [(0, 28, 36), (0, 44, 50), (1, 20, 22), (1, 30, 34)]
    assert pos.remaining == 20 and pos.consumed_samples == 2 * 20 + 3 * 8
    assert DataPosition.from_dict(json.loads(json.dumps(pos.to_dict()))) == pos
    with pytest.raises(ValueError):
        pos.advance(pos.remaining + 1)


def test_position_of_other_data_or_damaged_is_refused(shards: Path) -> None:
    _, pos = run(shards, 2, 12, None, steps=3)
    with pytest.raises(UserError, match="epoch"):
        load_batches(shards, "train", 12, 0, 2, SEED, EPOCH + 1, position=pos, shuffle_buffer=BUF)
    with pytest.raises(UserError, match="limit"):
        load_batches(shards, "train", 12, 0, 2, SEED, EPOCH, position=pos, shuffle_buffer=BUF, limit=500)
    with pytest.raises(UserError, match="total"):  # the shards were re-made, or a bad one is now skipped
        load_batches(shards, "train", 12, 0, 2, SEED, EPOCH, position={**pos, "total": N + 1}, shuffle_buffer=BUF)
    with pytest.raises(UserError, match="damaged"):
        DataPosition.from_dict({**pos, "layouts": [{"world": 2, "span": 600, "consumed": 0}]})
    with pytest.raises(ValueError):
        load_batches(shards, "train", 12, 0, 2, SEED, EPOCH, position=pos, start_batch=1)


def test_dump_hook_writes_the_consumed_ids(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEDIST_DUMP_IDS", str(tmp_path))
    ids, _ = run(shards, 2, 12, None, steps=4)
    for r in range(2):
        (f,) = tmp_path.glob(f"train-epoch{EPOCH}-world2-rank{r}-pid*.i64")
        assert np.array_equal(np.fromfile(f, dtype=np.int64), ids[r])


# ---------------------------------------------------------------- through the engine (accelerate launch)


def _launch(run_py: Callable[..., subprocess.CompletedProcess], cfg: Path, procs: int, *overrides: str,
            dump: Path | None = None) -> subprocess.CompletedProcess:
    """launch/train.py on ``procs`` gloo processes (plain python for one), as a user runs it."""
    accel = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {"AEDIST_DUMP_IDS": str(dump)} if dump else {}
    return run_py([*(accel if procs > 1 else []), "launch/train.py", "--config", str(cfg), *overrides], env=env)


def _config(tmp: Path, shards: Path, name: str, epochs: int = 2) -> Path:
    # tiny_shards: 256 train samples in blocks of 32; global batch 48 (1, 2 or 3 ranks) = 5 steps an epoch
    cfg = {"run": {"name": name, "dir": str(tmp / "runs")},
           "data": {"shards": str(shards), "batch_size": 48, "eval_batch_size": 64, "shuffle_buffer": 64},
           "model": {"channels": [8, 16, 32], "latent_dim": 4},
           "train": {"epochs": epochs, "seed": 3, "checkpoint_every": 2},
           "log": {"wandb": "disabled", "every": 1, "probe_size": 16, "figures_every": 1000},
           "eval": {"knn_train": 64}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _consumed(dump: Path, epoch: int) -> np.ndarray:
    files = sorted(dump.glob(f"train-epoch{epoch}-*.i64"))
    return np.concatenate([np.fromfile(f, dtype=np.int64) for f in files]) if files else np.empty(0, np.int64)


@pytest.mark.slow
@pytest.mark.parametrize("old, new, change, glob, accum", [
    (1, 2, [], 48, 1), (2, 3, [], 48, 1),
    (2, 2, ["data.batch_size=96"], 96, 1),  # a global batch change on the same world
    # a shrink to 1 rank, with the same global batch in micro-batches of half the size (the plain 2 -> 1
    # launch is test_launch_2_to_1_final_loss_within_5_percent; in-process, test_world_change_... covers it)
    (2, 1, ["train.grad_accum=2"], 48, 2),
])
def test_launch_resume_on_another_world_uses_every_sample_once(tmp_path: Path, tiny_shards: Path, run_py, old: int, new: int,
                                                              change: list[str], glob: int, accum: int) -> None:
    cfg, dump = _config(tmp_path, tiny_shards, "elastic"), tmp_path / "ids"
    dump.mkdir()
    first = _launch(run_py, cfg, old, "train.max_steps=2", dump=dump)  # stops mid-epoch 0 with a checkpoint
    assert first.returncode == 0, first.stderr[-2000:]
    second = _launch(run_py, cfg, new, "train.max_steps=0", *change, dump=dump)
    assert second.returncode == 0, second.stderr[-2000:]
    epoch0, epoch1 = _consumed(dump, 0), _consumed(dump, 1)
    assert len(np.unique(epoch0)) == len(epoch0), "a sample was used twice in the interrupted epoch"
    assert 0 <= 256 - len(epoch0) < 256 % 48 + glob  # drop_last: the epoch's remainder and the re-split's tail
    assert np.all((epoch0 >= 0) & (epoch0 < 256))
    steps = 256 // (glob // accum) // accum  # the next epoch: the new geometry's normal layout
    assert len(np.unique(epoch1)) == len(epoch1) == steps * glob
    summary = json.loads((tmp_path / "runs/elastic/summary.json").read_text())
    assert summary["world_sizes"] == [old, new]
    if old != new:
        assert "world size" in second.stdout + second.stderr


@pytest.mark.slow
def test_launch_2_to_1_final_loss_within_5_percent(tmp_path: Path, tiny_shards: Path, run_py) -> None:
    ref = _launch(run_py, _config(tmp_path, tiny_shards, "ref", epochs=6), 2)
    assert ref.returncode == 0, ref.stderr[-2000:]
    cfg = _config(tmp_path, tiny_shards, "moved", epochs=6)
    first = _launch(run_py, cfg, 2, "train.max_steps=20")
    assert first.returncode == 0, first.stderr[-2000:]
    second = _launch(run_py, cfg, 1, "train.max_steps=0")
    assert second.returncode == 0, second.stderr[-2000:]
    v_ref = json.loads((tmp_path / "runs/ref/summary.json").read_text())["val/loss"]
    v_moved = json.loads((tmp_path / "runs/moved/summary.json").read_text())["val/loss"]
    print(f"final val loss: uninterrupted 2 processes {v_ref:.5f}, resumed 2 -> 1 {v_moved:.5f} ({(v_moved - v_ref) / v_ref:+.2%})")
    assert abs(v_moved - v_ref) / v_ref <= 0.05, (v_ref, v_moved)
