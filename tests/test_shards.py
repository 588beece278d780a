"""Block shards: round trip, manifest, plain tar / webdataset readability, idempotency, corruption."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import webdataset as wds

from aedist.data.loader import load_batches
from aedist.data.shards import read_manifest, write_shards
from aedist.errors import UserError


def make(n: int, shape=(1, 5, 4), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random images; labels are unique ids so every sample can be matched back to its source."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n, dtype=np.int64)


def read_all(d, split="train", **kw) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*load_batches(d, split, 7, shuffle=False, drop_last=False, **kw))
    return np.concatenate(xs), np.concatenate(ys)


def test_round_trip_equals_source(tmp_path):
    splits = {"train": make(300), "test": make(45, seed=1)}
    m = write_shards(tmp_path, splits, ["a", "b"], samples_per_block=16, blocks_per_shard=4, seed=3)
    assert m.shape == (1, 5, 4) and m.classes == ["a", "b"]
    for split, (x, y) in splits.items():
        gx, gy = read_all(tmp_path, split)
        assert sorted(gy.tolist()) == y.tolist()  # every sample exactly once
        np.testing.assert_array_equal(gx, x[gy])  # pixels travel with their label
        assert not np.array_equal(gy, np.sort(gy))  # shuffled at pack time


def test_manifest_records_blocks_counts_and_sha(tmp_path):
    m = write_shards(tmp_path, {"train": make(150)}, ["a"], samples_per_block=16, blocks_per_shard=4)
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    info = m.splits["train"]
    assert info.num_samples == 150 and [s.num_samples for s in info.shards] == [64, 64, 22]
    assert info.shards[2].blocks == [16, 6]
    for s in info.shards:
        assert s.sha256 == hashlib.sha256((tmp_path / s.name).read_bytes()).hexdigest()
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["shape"] == [1, 5, 4] and on_disk["version"] == 1 and "content_sha256" in on_disk["source"]
    assert read_manifest(tmp_path).splits["train"].shards[0].blocks == [16] * 4


def test_plain_tarfile_and_webdataset_read_our_shards(tmp_path):
    x, y = make(40)
    write_shards(tmp_path, {"train": (x, y)}, ["a"], samples_per_block=16, blocks_per_shard=8)
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        names = tar.getnames()
        arrays = {n: np.load(io.BytesIO(tar.extractfile(n).read())) for n in names}
    assert names[:2] == ["train000000b0000.images.npy", "train000000b0000.labels.npy"]
    labels = np.concatenate([a for n, a in arrays.items() if n.endswith("labels.npy")])
    images = np.concatenate([a for n, a in arrays.items() if n.endswith("images.npy")])
    np.testing.assert_array_equal(images, x[labels])
    samples = list(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False).decode())
    assert [len(s["labels.npy"]) for s in samples] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate([s["images.npy"] for s in samples]), images)


def test_repack_is_noop_and_other_data_needs_force(tmp_path, capsys):
    data = {"train": make(50)}
    write_shards(tmp_path, data, ["a"], samples_per_block=16, source={"dataset": "x"})
    mtime = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    write_shards(tmp_path, data, ["a"], samples_per_block=16, source={"dataset": "x"})
    assert "already packed" in capsys.readouterr().out
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="different dataset"):
        write_shards(tmp_path, {"train": make(50, seed=9)}, ["a"], samples_per_block=16, source={"dataset": "x"})
    m = write_shards(tmp_path, {"train": make(20, seed=9)}, ["a"], samples_per_block=16, force=True)
    assert m.splits["train"].num_samples == 20 and read_all(tmp_path)[1].size == 20


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF  # inside image bytes: only the sha256 can tell
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()


@pytest.mark.parametrize("how,msg", [("flip", "sha256"), ("truncate", "truncated"), ("missing", "missing")])
def test_bad_shard_raises_naming_it(tmp_path, how, msg):
    write_shards(tmp_path, {"train": make(100)}, ["a"], samples_per_block=16, blocks_per_shard=2)
    _corrupt(tmp_path / "train-000001.tar", how)
    with pytest.raises(UserError, match=msg) as err:
        read_all(tmp_path)
    assert "train-000001.tar" in str(err.value) and "\n" not in str(err.value)


def test_truncated_caught_without_sha(tmp_path):
    write_shards(tmp_path, {"train": make(100)}, ["a"], samples_per_block=16, blocks_per_shard=2)
    _corrupt(tmp_path / "train-000000.tar", "truncate")
    with pytest.raises(UserError, match="train-000000.tar"):
        read_all(tmp_path, verify=False)


def test_skip_counts_and_warns(tmp_path, caplog):
    x, y = make(100)
    m = write_shards(tmp_path, {"train": (x, y)}, ["a"], samples_per_block=16, blocks_per_shard=2)
    _corrupt(tmp_path / "train-000001.tar", "flip")
    stats: dict = {}
    with caplog.at_level(logging.WARNING):
        gx, gy = read_all(tmp_path, on_error="skip", stats=stats)
    assert stats["skipped_shards"] == 1 and "train-000001.tar" in caplog.text
    with tarfile.open(tmp_path / "train-000002.tar") as tar:  # an intact shard: its labels must be there
        good = np.load(io.BytesIO(tar.extractfile("train000002b0000.labels.npy").read()))
    assert set(good.tolist()) <= set(gy.tolist()) and len(gy) == 100 - m.splits["train"].shards[1].num_samples
    np.testing.assert_array_equal(gx, x[gy])


def test_missing_folder_names_pack_command(tmp_path):
    with pytest.raises(UserError, match=r"python launch/pack.py .* --out .*nowhere"):
        load_batches(tmp_path / "nowhere")


def test_missing_manifest_says_so_not_no_images_found(tmp_path):
    """Issue 12 item 14: a shards folder without manifest.json names the missing manifest and the fix."""
    def error(d) -> str:
        with pytest.raises(UserError) as err:
            read_manifest(d)
        assert "no images found" not in str(err.value)
        return str(err.value)

    write_shards(tmp_path / "blocks", {"train": make(40)}, ["a"], samples_per_block=8, blocks_per_shard=2)
    (tmp_path / "blocks" / "manifest.json").unlink()  # block shards whose manifest was deleted
    msg = error(tmp_path / "blocks")
    assert "has no manifest.json" in msg and "train-000000.tar" in msg and "--force" in msg, msg
    with pytest.raises(UserError, match="has no manifest.json"):  # the loader (and so training) says the same
        load_batches(tmp_path / "blocks")
    (tmp_path / "blocks" / ".pack").mkdir()  # a streamed folder pack that was killed before its manifest
    (tmp_path / "blocks" / ".pack" / "plan.json").write_text("{}")
    msg = error(tmp_path / "blocks")
    assert "has no manifest.json" in msg and "did not finish" in msg and "same launch/pack.py command again" in msg, msg
    (tmp_path / "empty").mkdir()
    msg = error(tmp_path / "empty")
    assert "has no manifest.json" in msg and "no .tar shards" in msg and "launch/pack.py" in msg, msg
    (tmp_path / "other").mkdir()
    with tarfile.open(tmp_path / "other" / "x.tar", "w") as tar:  # some other tool's tar without images
        info = tarfile.TarInfo("a.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    msg = error(tmp_path / "other")
    assert "has no manifest.json" in msg and "no per-sample images" in msg, msg


def test_reads_standard_per_sample_png_shards(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 1, 6, 5), dtype=np.uint8)
    with wds.ShardWriter(str(tmp_path / "train-%06d.tar"), maxcount=12, verbose=0) as sink:
        for i in range(30):
            buf = io.BytesIO()
            Image.fromarray(x[i, 0]).save(buf, format="PNG")
            sink.write({"__key__": f"k{i:04d}", "png": buf.getvalue(), "cls": i})
    m = read_manifest(tmp_path)
    assert m.layout == "samples" and m.shape == (1, 6, 5) and m.splits["train"].num_samples == 30
    gx, gy = read_all(tmp_path)
    assert sorted(gy.tolist()) == list(range(30))
    np.testing.assert_array_equal(gx, x[gy])
    assert sum(len(b[1]) for b in load_batches(tmp_path, "train", 4, world_size=2, rank=1)) == 12
