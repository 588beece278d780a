"""Hostile-user cases, part 3 (issue 25 items 3, 4, 5, 8): shards re-packed in place under a run, YAML
with a key written twice, a disk that fills up while checkpointing, images whose modes PIL's plain
``convert`` gets wrong. Each asserts the promised behaviour against an independent reference."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aedist.config import load_config, read_yaml
from aedist.data import load_batches, read_manifest
from aedist.data.sources import load_image, to_8bit
from aedist.errors import UserError
from aedist.resume import data_hash

ROOT = Path(__file__).resolve().parents[1]


def overrides(shards: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run.dir={tmp}", f"run.name={name}", "data.batch_size=32", "train.epochs=2",
            "log.wandb=disabled", "train.mixed_precision=no", "train.compile=false", "train.cpu=true",
            "train.checkpoint_every=2", "train.keep_last=5", "model.channels=[8,16]", *extra]


def fit(shards: Path, tmp: Path, name: str, *extra: str):
    from aedist.engine import Trainer

    trainer = Trainer(load_config(None, overrides(shards, tmp, name, *extra)))
    return trainer, trainer.fit()


def train_cli(run_py: Callable[..., subprocess.CompletedProcess], shards: Path, tmp: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """launch/train.py in a subprocess, as a user runs it (no config file: every setting an override)."""
    return run_py(["launch/train.py", *overrides(shards, tmp, name, *extra)], env={"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    # The progress bar redraws its line with \r and has not ended it when a mid-run error is printed.
    lines = [seg[seg.index("error:"):] for seg in re.split(r"[\r\n]", proc.stderr) if "error:" in seg]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- item 3: shards re-packed under a run


def write_idx(folder: Path, per_class: int, seed: int) -> None:
    """A tiny Fashion-MNIST look-alike in IDX files (4 classes, ``per_class`` train and per_class // 4 test
    images each), which launch/pack.py reads with --source like the real one."""
    from conftest import make_images

    folder.mkdir(parents=True)
    for stem, n in (("train", per_class), ("t10k", per_class // 4)):
        x, _ = make_images(4 * n, seed=seed)
        y = np.repeat(np.arange(4), n).astype(np.uint8)  # exactly n per class: any 2-class subset has the same count
        x = x[:, 0]
        (folder / f"{stem}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + np.array(x.shape, ">i4").tobytes() + x.tobytes())
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + np.array(y.shape, ">i4").tobytes() + y.tobytes())


def test_resume_on_shards_repacked_in_place_is_refused_but_finetuning_on_them_is_not(tmp_path: Path, run_py) -> None:
    """The report: pack.py --force with another class subset (same sample count) between a stop and a
    resume let the run finish on the other data with exit 0. Now the resume exits 2 naming both hashes;
    a NEW run started from that run's checkpoint (fine-tuning) still may use the other data."""
    write_idx(tmp_path / "idx", per_class=64, seed=0)
    shards = tmp_path / "shards"
    pack = ["launch/pack.py", "fashion-mnist", "--source", str(tmp_path / "idx"), "--out", str(shards), "--samples-per-block", "16"]
    assert (proc := run_py([*pack, "--classes", "0,1"])).returncode == 0, proc.stderr
    first = read_manifest(shards)
    proc = train_cli(run_py, shards, tmp_path, "a", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert (proc := run_py([*pack, "--classes", "2,3", "--force"])).returncode == 0, proc.stderr
    second = read_manifest(shards)
    assert {k: v.num_samples for k, v in second.splits.items()} == {k: v.num_samples for k, v in first.splits.items()}
    old, new = first.source["content_sha256"], second.source["content_sha256"]
    assert old != new

    proc = train_cli(run_py, shards, tmp_path, "a", "train.max_steps=4")
    line = one_error_line(proc)
    assert proc.returncode == 2
    assert old[:16] in line and new[:16] in line and "data.shards" in line and "train.resume=never" in line
    assert not (tmp_path / "a" / "checkpoints" / "step-4").exists()  # refused before any training step

    source = tmp_path / "a" / "checkpoints" / "step-2"
    trainer, code = fit(shards, tmp_path, "b", "train.max_steps=4", f"train.resume={source}")
    assert code == 0 and trainer.state.step == 4 and trainer.state.started_from == str(source)
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["data_hash"] == new  # the fine-tuned run records its own data: its resumes are checked against that


def test_checkpoint_from_before_the_data_hash_resumes_and_records_it(tmp_path: Path, tiny_shards: Path) -> None:
    fit(tiny_shards, tmp_path, "old", "train.max_steps=2")
    ckpts = tmp_path / "old" / "checkpoints"
    for folder in ckpts.iterdir():  # as written by aedist before data_hash existed
        state = json.loads((folder / "state.json").read_text())
        assert state.pop("data_hash") == read_manifest(tiny_shards).source["content_sha256"]
        (folder / "state.json").write_text(json.dumps(state))
    trainer, code = fit(tiny_shards, tmp_path, "old", "train.max_steps=4")
    assert code == 0 and trainer.state.resumed_from == [2]
    assert json.loads((ckpts / "step-4" / "state.json").read_text())["data_hash"] == data_hash(read_manifest(tiny_shards))


def test_data_hash_of_packs_without_a_content_hash_follows_the_shard_bytes(tmp_path: Path, tiny_shards: Path) -> None:
    """Streamed folder packs and foreign shards record no content hash: the shards' own sha256 stand in."""
    shards = tmp_path / "s"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    with_content = data_hash(read_manifest(shards))
    del manifest["source"]["content_sha256"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    os.utime(shards / "manifest.json", ns=(1, 1))  # read_manifest caches by mtime: make this one distinct
    plain = data_hash(read_manifest(shards))
    assert len(plain) == 64 and plain != with_content
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (shards / "manifest.json").write_text(json.dumps(manifest))
    os.utime(shards / "manifest.json", ns=(2, 2))
    assert data_hash(read_manifest(shards)) != plain


# ----------------------------------------------------------------------------- item 5: duplicate YAML keys


@pytest.mark.parametrize("text, words", [
    ("train:\n  epochs: 3\nrun:\n  name: x\ntrain:\n  seed: 1\n", "duplicate key 'train' on lines 1 and 5"),
    ("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n", "duplicate key 'lr' on lines 2 and 4"),
    ("eval:\n  corruptions:\n    rot: [{rotate: {max_degrees: 90, max_degrees: 180}}]\n", "duplicate key 'max_degrees' on lines 3 and 3"),
    ("corruption:\n  - noise:\n      std: 0.1\n      std: 0.3\n", "duplicate key 'std' on lines 3 and 4"),
])
def test_duplicate_yaml_keys_are_refused_at_every_level(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=words):
        load_config(path)


def test_duplicate_yaml_keys_exit_2_in_configs_studies_and_overrides(tmp_path: Path, run_py) -> None:
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("train:\n  epochs: 3\n\ntrain:\n  max_steps: 2\n")
    proc = run_py(["launch/train.py", "--config", str(cfg)])
    assert proc.returncode == 2 and "duplicate key 'train' on lines 1 and 4" in one_error_line(proc)
    study = tmp_path / "claims.yaml"
    study.write_text("experiments:\n  - name: a\n    name: b\n")
    from aedist.study import load_study

    with pytest.raises(UserError, match="study file .* duplicate key 'name' on lines 2 and 3"):
        load_study(study)
    with pytest.raises(UserError, match="bad override .*duplicate key 'rot'"):
        load_config(None, ["eval.corruptions={rot: [], rot: [{rot90: {}}]}"])


def test_yaml_merge_keys_and_the_shipped_files_still_load(tmp_path: Path) -> None:
    """No false alarm: a ``<<: *anchor`` merge may override what it brings in, and every YAML file the
    toolkit reads from this repository (configs, studies, sweeps) has no duplicate."""
    path = tmp_path / "m.yaml"
    path.write_text("base: &b {lr: 0.1, momentum: 0.9}\noptim:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml(path, "config")["optim"] == {"lr": 0.2, "momentum": 0.9}
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(files) > 10
    for f in files:
        read_yaml(f, "shipped file")


# ----------------------------------------------------------------------------- item 8: disk full while checkpointing


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[Path, int], None]]:
    """``mount(path, bytes)``: a real tmpfs of that size at ``path`` (mounted again to resize it);
    unmounted at the end. Needs root (CAP_SYS_ADMIN); skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(path: Path, size: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"remount,size={size}" if path in mounted else f"size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); run as root for the disk-full tests")
        if path not in mounted:
            mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_full_disk_while_checkpointing_exits_74_and_cleans_up(tmp_path: Path, tiny_shards: Path, run_py, small_fs, writer: str) -> None:
    """A real full filesystem under checkpoints/: the step-4 save runs out of room inside
    model.safetensors (SafetensorError) or inside optimizer.bin (torch.save's RuntimeError, which names
    no errno at all). Either way: exit 74, one line, no traceback, the partial folder removed."""
    ckpts = tmp_path / "full" / "checkpoints"
    small_fs(ckpts, 64 << 20)
    fit(tiny_shards, tmp_path, "full", "train.max_steps=2")  # step-2 and best fit
    model, optim = (ckpts / "step-2" / "model.safetensors").stat().st_size, (ckpts / "step-2" / "optimizer.bin").stat().st_size
    room = model // 2 if writer == "safetensors" else model + 8192 + optim // 2
    small_fs(ckpts, _used(ckpts) + room)
    proc = train_cli(run_py, tiny_shards, tmp_path, "full", "train.max_steps=4")
    line = one_error_line(proc)
    assert proc.returncode == 74
    assert "could not write checkpoint" in line and "No space left on device" in line
    assert ("SafetensorError" if writer == "safetensors" else "RuntimeError") in line  # the library that hit the wall
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step-2"]  # no .tmp-step-4, no probe file


def test_disk_full_is_recognised_however_it_is_wrapped(tmp_path: Path) -> None:
    from safetensors import SafetensorError

    from aedist.checkpoint import disk_full

    def chained(outer: type[Exception], inner: BaseException) -> Exception:
        try:
            try:
                raise inner
            except BaseException:
                raise outer("writing failed")  # noqa: B904 - the implicit __context__ is what libraries leave
        except Exception as err:  # noqa: BLE001
            return err

    assert disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))) == "Disk quota exceeded"
    assert disk_full(chained(RuntimeError, OSError(errno.ENOSPC, "x"))) == "No space left on device"
    assert disk_full(SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")) == "Disk quota exceeded"
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                                  "data/0: file write failed, errno 28")) == "No space left on device"
    # Not a full disk: another failure, and torch's errno-less message on a filesystem that has room.
    assert disk_full(chained(RuntimeError, OSError(errno.EACCES, "denied"))) == ""
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), tmp_path) == ""
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


# ----------------------------------------------------------------------------- item 4: image modes


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[None], 3, 0) if a.ndim == 2 else a.transpose(2, 0, 1)


RNG = np.random.default_rng(25)
U16 = RNG.integers(0, 65536, (8, 8), dtype=np.uint16)
U16[0, :4] = [0, 128, 65407, 65535]  # the ends, and the two values either side of a rounding step (0, 0, 254, 255)
GREY16 = np.rint(U16 / 257).astype(np.uint8)  # 255/65535 == 1/257
RGB = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
ALPHA[0, :2] = [0, 255]


def _case_i16(d: Path) -> tuple[Path, int, np.ndarray]:
    return _save(Image.fromarray(U16), d / "g16.png"), 1, GREY16[None]


def _case_i16_rgb(d: Path) -> tuple[Path, int, np.ndarray]:
    return _save(Image.fromarray(U16), d / "g16.png"), 3, _rgb(GREY16)


def _case_i16b(d: Path) -> tuple[Path, int, np.ndarray]:
    img = Image.fromarray(U16.astype(">u2"))
    assert img.mode == "I;16B"
    return _save(img, d / "g16b.tif"), 1, GREY16[None]


def _case_i32(d: Path) -> tuple[Path, int, np.ndarray]:
    return _save(Image.fromarray(U16.astype(np.int32)), d / "i32.tif"), 1, GREY16[None]


def _case_float(d: Path) -> tuple[Path, int, np.ndarray]:
    f = RNG.uniform(-0.25, 1.25, (8, 8)).astype(np.float32)
    f[0, :3] = [np.nan, 0.5, 1.0]
    expected = np.rint(np.clip(np.nan_to_num(f, nan=0.0), 0, 1) * 255).astype(np.uint8)
    return _save(Image.fromarray(f), d / "f32.tif"), 1, expected[None]


def _case_palette_alpha(d: Path) -> tuple[Path, int, np.ndarray]:
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    entry_alpha = RNG.integers(0, 256, 256, dtype=np.uint8)
    idx = RNG.integers(0, 16, (8, 8), dtype=np.uint8)
    img = Image.fromarray(idx, "L").convert("P")
    img.putpalette(palette.tobytes())
    path = _save(img, d / "pal.png", transparency=entry_alpha[:16].tobytes())  # a PNG tRNS chunk: one alpha per entry
    expected = np.rint(palette[idx] * (entry_alpha[idx][..., None] / 255)).astype(np.uint8)
    return path, 3, _rgb(expected)


def _case_palette_no_alpha(d: Path) -> tuple[Path, int, np.ndarray]:
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    img = Image.fromarray(idx, "L").convert("P")
    img.putpalette(palette.tobytes())
    return _save(img, d / "pal.gif"), 3, _rgb(palette[idx])


def _case_rgba(d: Path) -> tuple[Path, int, np.ndarray]:
    expected = np.rint(RGB * (ALPHA[..., None] / 255)).astype(np.uint8)  # over black
    return _save(Image.fromarray(np.dstack([RGB, ALPHA])), d / "rgba.png"), 3, _rgb(expected)


def _case_la(d: Path) -> tuple[Path, int, np.ndarray]:
    grey = RGB[..., 0]
    expected = np.rint(grey * (ALPHA / 255)).astype(np.uint8)
    return _save(Image.fromarray(np.dstack([grey, ALPHA]), "LA"), d / "la.png"), 1, expected[None]


def _case_cmyk(d: Path) -> tuple[Path, int, np.ndarray]:
    cmyk = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    expected = np.rint(255 * (1 - cmyk[..., :3] / 255) * (1 - cmyk[..., 3:] / 255)).astype(np.uint8)
    return _save(Image.fromarray(cmyk, "CMYK"), d / "cmyk.tif"), 3, _rgb(expected)


def _case_bilevel(d: Path) -> tuple[Path, int, np.ndarray]:
    bits = RNG.random((8, 8)) > 0.5
    return _save(Image.fromarray(bits), d / "bits.png"), 1, (bits * 255).astype(np.uint8)[None]


CASES = {f.__name__[6:]: f for f in (_case_i16, _case_i16_rgb, _case_i16b, _case_i32, _case_float, _case_palette_alpha,
                                     _case_palette_no_alpha, _case_rgba, _case_la, _case_cmyk, _case_bilevel)}


@pytest.mark.parametrize("case", CASES)
def test_every_image_mode_converts_to_8_bits_like_an_independent_reference(tmp_path: Path, case: str) -> None:
    path, channels, expected = CASES[case](tmp_path)
    assert np.array_equal(load_image(path, 8, channels), expected)


def test_alpha_over_white_and_images_out_of_the_assumed_range(tmp_path: Path) -> None:
    rgba = Image.fromarray(np.dstack([RGB, ALPHA]))
    white = np.rint(RGB * (ALPHA[..., None] / 255) + 255 * (1 - ALPHA[..., None] / 255)).astype(np.uint8)
    assert np.array_equal(np.asarray(to_8bit(rgba, 3, "white")), white)
    pa = Image.new("PA", (8, 8))
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    pa.putpalette(palette.tobytes())
    idx = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    pa.putdata(list(zip(idx.ravel().tolist(), ALPHA.ravel().tolist())))
    assert np.array_equal(np.asarray(to_8bit(pa, 3)), np.rint(palette[idx] * (ALPHA[..., None] / 255)).astype(np.uint8))
    wide = U16.astype(np.int32) * 4  # a 32-bit integer image beyond 16 bits: its range is unknown, so it is not guessed
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        load_image(_save(Image.fromarray(wide), tmp_path / "wide.tif"), 8, 1)


# EXIF orientation -> how the stored pixels are shown (EXIF 2.3, tag 0x0112), written with numpy.
SHOWN = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.swapaxes(0, 1),
         6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(SHOWN))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(RGB), tmp_path / "o.png", exif=exif)
    assert np.array_equal(load_image(path, 8, 3), _rgb(np.ascontiguousarray(SHOWN[orientation](RGB))))


def test_packed_folder_holds_the_pixels_as_displayed(tmp_path: Path, run_py) -> None:
    """End to end through launch/pack.py folder: a 16-bit PNG, a camera JPEG stored sideways with
    EXIF orientation 6, and an RGBA PNG land in the shards as an independent conversion says."""
    photos = tmp_path / "photos"
    for c in ("a16", "bjpeg", "crgba"):
        (photos / c).mkdir(parents=True)
    Image.fromarray(U16).save(photos / "a16" / "x.png")
    colours = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    blocks = np.kron(colours, np.ones((16, 16, 1), np.uint8))  # 64x64 of flat 16px blocks: 2x2 pixels each at size 8
    stored = np.ascontiguousarray(np.rot90(blocks, 1))  # the camera stores the scene turned; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(photos / "bjpeg" / "x.jpg", quality=100, subsampling=0, exif=exif)
    Image.fromarray(np.dstack([RGB, ALPHA])).save(photos / "crgba" / "x.png")
    out = tmp_path / "shards"
    proc = run_py(["launch/pack.py", "folder", "--source", str(photos), "--out", str(out), "--size", "8", "--val-fraction", "0",
                   "--workers", "1"])
    assert proc.returncode == 0, proc.stderr
    x, y = (np.concatenate(t) for t in zip(*load_batches(out, "train", 3, shuffle=False, drop_last=False)))
    got = {int(label): img for img, label in zip(x, y)}
    assert np.array_equal(got[0], _rgb(GREY16))
    assert np.array_equal(got[2], _rgb(np.rint(RGB * (ALPHA[..., None] / 255)).astype(np.uint8)))
    shown, sideways = (_rgb(np.kron(c, np.ones((2, 2, 1), np.uint8))).astype(int) for c in (colours, np.rot90(colours, 1)))
    assert np.abs(got[1] - shown).max() <= 6, np.abs(got[1] - shown).max()  # JPEG noise only
    assert np.abs(got[1] - sideways).mean() > 30  # what was packed before: the image as stored
    assert read_manifest(out).source["decode"] == 2
