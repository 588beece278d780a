"""Block shards: write them with a manifest, index and read their blocks, verify their sha256.

    m = write_shards("shards/fashion4", {"train": (x, y), "test": (xt, yt)}, classes)
    m = read_manifest("shards/fashion4")          # also accepts per-sample png/jpg+cls shards
    m = read_manifest("https://host/shards/fashion4", cache_dir="~/.cache/aedist/shards")  # see remote.py
    with BlockShardWriter(out / "train-000000.tar") as w:   # streaming: one block at a time
        w.add_block("train000000b0000", images, labels)

Layout of ``OUT/{split}-000000.tar``: WebDataset shards whose every member key is a BLOCK of samples,
``KEY.images.npy`` uint8 [n, C, H, W] and ``KEY.labels.npy`` int64 [n]. Samples are shuffled globally
at pack time (seeded). ``manifest.json`` records shape, classes, per-shard block sizes, byte sizes and
sha256, and a ``source`` description (with a content hash) that tells a re-pack of the same data (a
no-op) from a different dataset (an error unless ``force``).

A manifest read from a URL has ``root`` = its local cache folder and ``url`` set (without credentials:
remote.py keeps those); :func:`fetch_shard` brings a shard into that folder (downloaded and
sha256-checked on first use), pins it there until :func:`release_shard`, and returns its path.
Every shard name a manifest gives, local or remote, must be a plain file name (remote.check_name).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aedist.data import remote
from aedist.data.remote import file_sha256
from aedist.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "aedist-blocks"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_EXTS = ("png", "jpg", "jpeg", "ppm", "pgm", "webp")
LABEL_EXTS = ("cls", "cls.txt", "label", "class")


@dataclass
class ShardInfo:
    name: str
    """File name inside the shards folder, e.g. ``train-000000.tar``."""
    num_samples: int
    blocks: list[int]
    """Samples in each block, in member order (a per-sample shard is one block)."""
    bytes: int = 0
    sha256: str = ""
    """Empty for foreign shards, which have no manifest to check against."""


@dataclass
class SplitInfo:
    num_samples: int
    shards: list[ShardInfo]


@dataclass
class Manifest:
    shape: tuple[int, int, int]
    """[C, H, W] of every image."""
    classes: list[str]
    splits: dict[str, SplitInfo]
    source: dict[str, Any] = field(default_factory=dict)
    dtype: str = "uint8"
    samples_per_block: int = 1024
    blocks_per_shard: int = 64
    seed: int = 0
    layout: str = "blocks"
    """``blocks`` (ours) or ``samples`` (standard per-sample shards from other tools)."""
    version: int = FORMAT_VERSION
    root: Path = Path(".")
    """Folder holding the shards: the shards folder itself, or the local cache of a URL."""
    url: str = ""
    """The http(s)://… (or other fsspec) URL the manifest was read from, without credentials; empty for a local folder."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        d.pop("url")
        return {"format": FORMAT, **d, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any], root: Path, where: str = "") -> Manifest:
        """The manifest ``d`` (parsed JSON) of the folder ``root``; ``where`` names it in errors (default root/manifest.json).

        A shard name that is not a plain file name is a UserError: names become paths under ``root``
        that the URL cache downloads into, so ``../x`` or ``/x`` would write anywhere.
        """
        splits = {k: SplitInfo(v["num_samples"], [ShardInfo(**s) for s in v["shards"]]) for k, v in d["splits"].items()}
        for sp in splits.values():
            for sh in sp.shards:
                remote.check_name(sh.name, where or str(root / MANIFEST))
        keys = ("source", "dtype", "samples_per_block", "blocks_per_shard", "seed", "layout", "version")
        return cls(tuple(d["shape"]), list(d["classes"]), splits, root=root, **{k: d[k] for k in keys if k in d})

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(f"split '{name}' not in {self.root} (has: {', '.join(self.splits)})")
        return self.splits[name]


def pack_command(out_dir: str | Path) -> str:
    """The command that makes a shards folder, for error messages."""
    return f"python launch/pack.py fashion-mnist --out {out_dir} (or another DATASET; see shards/README.md)"


def content_hash(splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str]) -> str:
    """sha256 over every split's images, labels and the class names: tells one dataset from another."""
    h = hashlib.sha256(json.dumps(class_names).encode())
    for name in sorted(splits):
        x, y = splits[name]
        h.update(f"{name}{x.shape}{x.dtype}".encode())
        for i in range(0, len(x), 8192):  # chunked: a memmap source is never read whole
            h.update(np.ascontiguousarray(x[i : i + 8192]).data)
        h.update(np.ascontiguousarray(y, dtype=np.int64).data)
    return h.hexdigest()


def _npy_header(a: np.ndarray) -> bytes:
    """The .npy header np.save writes for ``a`` (format 1.0): the data follows it unchanged."""
    bio = io.BytesIO()
    np.lib.format.write_array_header_1_0(bio, np.lib.format.header_data_from_array_1_0(a))
    return bio.getvalue()


class BlockShardWriter:
    """Write one block shard member by member, hashing as it goes; renamed into place on :meth:`close`.

    The bytes are those of ``tarfile`` in USTAR format with mtime 0 and mode 0444 (same data -> same
    bytes -> same sha256), but no block is ever copied: the tar and .npy headers are written, then the
    array's own buffer. A writer that is not closed (an exception, a kill) leaves only ``.NAME.tmp-PID``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.fh = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.blocks: list[int] = []

    def _write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.hash.update(data)
        self.size += len(data)

    def add(self, name: str, *parts: bytes | memoryview) -> None:
        """One tar member ``name`` whose content is the concatenation of ``parts``."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = sum(len(p) for p in parts), 0o444, 0
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        for p in parts:
            self._write(p)
        self._write(bytes(-info.size % tarfile.BLOCKSIZE))

    def add_block(self, key: str, images: np.ndarray, labels: np.ndarray) -> None:
        """``KEY.images.npy`` (uint8 [n,C,H,W]) and ``KEY.labels.npy`` (int64 [n]); no dots in ``key``."""
        images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels, dtype=np.int64)
        self.add(f"{key}.images.npy", _npy_header(images), memoryview(images).cast("B"))
        self.add(f"{key}.labels.npy", _npy_header(labels), memoryview(labels).cast("B"))
        self.blocks.append(len(labels))

    def close(self) -> ShardInfo:
        """End the archive as tarfile does (two zero blocks, padded to a record), rename it into place."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self.size % tarfile.RECORDSIZE))
        self.fh.close()
        os.replace(self.tmp, self.path)
        return ShardInfo(self.path.name, sum(self.blocks), list(self.blocks), self.size, self.hash.hexdigest())

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlockShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.info = self.close()
        else:
            self.abort()


def write_manifest(out_dir: str | Path, m: Manifest) -> None:
    """Write ``manifest.json`` atomically (tmp + rename): a folder never holds half a manifest."""
    out = Path(out_dir)
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(m.to_json(), indent=1))
    os.replace(tmp, out / MANIFEST)


def write_shards(
    out_dir: str | Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    *,
    samples_per_block: int = 1024,
    blocks_per_shard: int = 64,
    seed: int = 0,
    source: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = False,
) -> Manifest:
    """Pack ``{split: (images uint8 [N,C,H,W], labels int [N])}`` into block shards under ``out_dir``.

    Packing the same data with the same settings again is a no-op ("already packed"); a different
    dataset in a folder that already holds a manifest raises UserError unless ``force``.
    """
    out = Path(out_dir)
    shapes = {tuple(x.shape[1:]) for x, _ in splits.values()}
    for name, (x, y) in splits.items():
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
            raise ValueError(f"split {name}: need uint8 [N,C,H,W] images and N labels, got {x.dtype} {x.shape}, {len(y)} labels")
    if len(shapes) != 1:
        raise ValueError(f"all splits must share one image shape, got {shapes}")
    if samples_per_block < 1 or blocks_per_shard < 1:
        raise UserError("--samples-per-block and --blocks-per-shard must be >= 1")
    src = json.loads(json.dumps(source or {}))  # JSON-normalised, so it compares equal to the stored one
    src["content_sha256"] = content_hash(splits, class_names)
    settings = {"samples_per_block": samples_per_block, "blocks_per_shard": blocks_per_shard, "seed": seed}
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        same = old.source == src and all(getattr(old, k) == v for k, v in settings.items())
        intact = all((out / s.name).is_file() and (out / s.name).stat().st_size == s.bytes for sp in old.splits.values() for s in sp.shards)
        if same and intact:
            log.info("already packed: %s", out)
            print(f"already packed: {out} ({', '.join(f'{k} {v.num_samples}' for k, v in old.splits.items())})")
            return old
        if not same and not force:
            raise UserError(f"{out} already holds a different dataset or packing ({old.source.get('dataset', '?')}); "
                            "pass --force to overwrite it, or choose another --out")
    elif out.is_dir() and any(out.glob("*.tar")) and not force:
        raise UserError(f"{out} holds .tar files but no {MANIFEST}; pass --force to overwrite them, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / MANIFEST, *out.glob("*.tar")]:
        stale.unlink(missing_ok=True)  # manifest goes first: a half-written folder never looks complete

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(x) for x, _ in splits.values()), unit="img", desc=f"pack {out.name}")
    rng = np.random.default_rng(seed)
    infos: dict[str, SplitInfo] = {}
    per_shard = samples_per_block * blocks_per_shard
    for name, (x, y) in splits.items():
        order = rng.permutation(len(x))  # global shuffle at pack time
        shards = []
        for s, lo in enumerate(range(0, len(x), per_shard)):
            with BlockShardWriter(out / f"{name}-{s:06d}.tar") as w:
                for b, blo in enumerate(range(lo, min(lo + per_shard, len(x)), samples_per_block)):
                    idx = order[blo : blo + samples_per_block]
                    w.add_block(f"{name}{s:06d}b{b:04d}", x[idx], y[idx])  # no dots in keys: webdataset splits at the first
                    if bar is not None:
                        bar.update(len(idx))
            shards.append(w.info)
        infos[name] = SplitInfo(len(x), shards)
    if bar is not None:
        bar.close()
    m = Manifest(shapes.pop(), list(class_names), infos, src, root=out, **settings)
    write_manifest(out, m)
    return m


# ----------------------------------------------------------------------------- reading

_MANIFESTS: dict[tuple[str, float], Manifest] = {}
_VERIFIED: dict[tuple[str, int, int], bool] = {}
_INDEX: dict[tuple[str, int, int], list[tuple[int, int]]] = {}


def read_manifest(shards_dir: str | Path, *, cache_dir: str | Path | None = None, cache_max_gb: float | None = None) -> Manifest:
    """The folder's manifest; for standard per-sample shards without one, an index built by scanning.

    ``shards_dir`` may be a URL (``https://…``, or any scheme fsspec reads): the manifest is fetched
    once per process and ``root`` is the local cache folder (``cache_dir``, default
    :func:`remote.resolve_cache`) that :func:`fetch_shard` fills. Later calls for the same URL that
    name no cache (``load_batches`` makes those) use the cache the last call that named one chose.
    """
    if remote.is_url(shards_dir):
        url = remote.register_url(str(shards_dir))  # without user:password@ from here on; remote.py keeps them
        if cache_dir is None and cache_max_gb is None and url in _URL_CACHE:
            return _read_remote(url, *_URL_CACHE[url])  # later calls without a cache (load_batches) use the first one's
        _URL_CACHE[url] = remote.resolve_cache(cache_dir, cache_max_gb)
        return _read_remote(url, *_URL_CACHE[url])
    root = Path(shards_dir)
    path = root / MANIFEST
    if path.is_file():
        key = (str(path.resolve()), path.stat().st_mtime)
        if key not in _MANIFESTS:
            try:
                _MANIFESTS[key] = Manifest.from_json(json.loads(path.read_text()), root)
            except (ValueError, KeyError, TypeError) as err:
                raise UserError(f"{path} is unreadable ({err}); re-make it with {pack_command(root)} --force") from None
        return _MANIFESTS[key]
    if root.is_dir() and any(root.glob("*.tar")):
        if _block_shards(root):  # ours, without the manifest that indexes them: scanning cannot help
            raise UserError(_no_manifest(root))
        return _scan_foreign(root)
    if root.is_dir():
        raise UserError(_no_manifest(root))
    raise UserError(f"shards folder '{root}' not found; make it with {pack_command(root)}")


def _block_shards(root: Path) -> bool:
    """True if the first .tar of ``root`` holds aedist blocks (``KEY.images.npy``) rather than per-sample images."""
    try:
        with tarfile.open(min(root.glob("*.tar"))) as tar:
            first = tar.next()
    except (tarfile.TarError, OSError):
        return False
    return first is not None and first.name.endswith(".images.npy")


def _no_manifest(root: Path) -> str:
    """Why ``root`` has no manifest, and the fix: an unfinished pack, a deleted manifest, or an empty folder."""
    tars = sorted(p.name for p in root.glob("*.tar"))
    if (root / ".pack" / "plan.json").is_file():  # aedist.data.pack's state: a folder pack that did not finish
        return (f"shards folder '{root}' has no {MANIFEST}: its pack did not finish ({len(tars)} shards written so far); "
                "run the same launch/pack.py command again to finish it (finished shards are kept)")
    if tars:
        return (f"shards folder '{root}' has no {MANIFEST} (it holds {len(tars)} block shards such as {tars[0]}, "
                f"but the manifest that indexes them is gone); re-make it with {pack_command(root)} --force")
    return f"shards folder '{root}' has no {MANIFEST} (and no .tar shards); make it with {pack_command(root)}"


_CACHE_BOUND: dict[str, float] = {}
_URL_CACHE: dict[str, tuple[Path, float]] = {}


def _read_remote(url: str, cache_dir: Path, max_gb: float) -> Manifest:
    folder = remote.cache_folder(url, cache_dir)
    key = (f"{url} -> {folder}", 0.0)  # fetched once per process and cache folder
    if key not in _MANIFESTS:
        text = remote.fetch_manifest(url, folder)
        try:
            m = Manifest.from_json(json.loads(text), folder, remote.shown(remote.join(url, MANIFEST)))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{remote.shown(remote.join(url, MANIFEST))} is not an aedist manifest ({err})") from None
        if m.layout != "blocks":
            raise UserError(f"{remote.shown(url)}: only block shards made by launch/pack.py can be read from a URL")
        m.url = url
        _MANIFESTS[key] = m
    _CACHE_BOUND[url] = max_gb
    return _MANIFESTS[key]


def fetch_shard(m: Manifest, shard: ShardInfo) -> Path:
    """Local path of ``shard``: in the folder itself, or (URL manifests) in the cache, downloaded and
    sha256-checked on first use; a second epoch or another process on the node reads it from disk.

    A URL's shard stays pinned in the cache (no process of the node evicts it) until
    :func:`release_shard`; each call needs one release.
    """
    path = m.root / shard.name
    if not m.url:
        return path
    path = remote.fetch(m.url, m.root, shard.name, shard.bytes, shard.sha256, _CACHE_BOUND.get(m.url, remote.DEFAULT_CACHE_MAX_GB))
    st = path.stat()
    _VERIFIED[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = True  # fetch checked its sha256: verify_shard need not
    return path


def release_shard(m: Manifest, shard: ShardInfo) -> None:
    """Undo one :func:`fetch_shard`: the reader is done with it, so the cache may evict it (no-op for a folder)."""
    if m.url:
        remote.unpin(m.root / shard.name)


def _scan_foreign(root: Path) -> Manifest:
    """Index per-sample shards (``KEY.png`` + ``KEY.cls``) made by other tools; one block per shard."""
    from PIL import Image

    splits: dict[str, SplitInfo] = {}
    shape = None
    for tar_path in sorted(root.glob("*.tar")):
        split = tar_path.name.split("-")[0].split(".")[0]
        keys: dict[str, set[str]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for mem in tar:
                    if mem.isfile():
                        base = mem.name.rsplit("/", 1)[-1]
                        key, _, ext = base.partition(".")
                        keys.setdefault(key, set()).add(ext.lower())
                        if shape is None and ext.lower() in IMAGE_EXTS:
                            img = Image.open(tar.extractfile(mem))
                            shape = (len(img.getbands()), img.height, img.width)
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"shard {tar_path} is unreadable ({err})") from None
        n = sum(1 for exts in keys.values() if exts & set(IMAGE_EXTS))
        info = splits.setdefault(split, SplitInfo(0, []))
        info.shards.append(ShardInfo(tar_path.name, n, [n], tar_path.stat().st_size))
        info.num_samples += n
    if shape is None:
        raise UserError(f"shards folder '{root}' has no {MANIFEST}, and its .tar files hold no per-sample images "
                        f"({'/'.join(IMAGE_EXTS)}) to index instead; make block shards with {pack_command(root)}")
    return Manifest(shape, [], splits, {"foreign": str(root)}, layout="samples", root=root)


def verify_shard(m: Manifest, shard: ShardInfo) -> None:
    """Check a shard's size and sha256 against the manifest, once per process (cached by size+mtime)."""
    path = m.root / shard.name
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing; re-make the folder with {pack_command(m.root)} --force") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key):
        return
    if shard.bytes and st.st_size != shard.bytes:
        raise UserError(f"shard {path} is truncated or altered ({st.st_size} bytes, manifest says {shard.bytes}); "
                        f"re-make it with {pack_command(m.root)} --force")
    if shard.sha256 and file_sha256(path) != shard.sha256:
        raise UserError(f"shard {path} is corrupt (sha256 mismatch); re-make it with {pack_command(m.root)} --force")
    _VERIFIED[key] = True


def block_offsets(m: Manifest, shard: ShardInfo) -> list[tuple[int, int]]:
    """Byte offsets of (images data, labels data) of each block in ``shard``: tar + npy headers parsed once."""
    path = m.root / shard.name
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _INDEX:
        return _INDEX[key]
    c, h, w = m.shape
    out: list[tuple[int, int]] = []
    try:
        with tarfile.open(path) as tar, open(path, "rb") as fh:
            members = [mem for mem in tar if mem.isfile()]
            for b, n in enumerate(shard.blocks):
                img, lab = members[2 * b], members[2 * b + 1]
                offs = []
                for mem, shape, dtype in ((img, (n, c, h, w), np.uint8), (lab, (n,), np.int64)):
                    fh.seek(mem.offset_data)
                    major, _ = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    got = read(fh)  # (shape, fortran_order, dtype)
                    data_off = fh.tell()
                    if got[0] != shape or got[1] or got[2] != np.dtype(dtype) or data_off + int(np.prod(shape)) * np.dtype(dtype).itemsize > mem.offset_data + mem.size:
                        raise ValueError(f"block {b} member {mem.name} is {got}, expected {shape} {np.dtype(dtype)}")
                    offs.append(data_off)
                out.append((offs[0], offs[1]))
    except (tarfile.TarError, OSError, ValueError, IndexError, EOFError) as err:
        raise UserError(f"shard {path} is truncated or unreadable ({err}); re-make it with {pack_command(m.root)} --force") from None
    if out and out[-1][1] + 8 * shard.blocks[-1] > st.st_size:
        raise UserError(f"shard {path} is truncated; re-make it with {pack_command(m.root)} --force")
    _INDEX[key] = out
    return out


def read_foreign(m: Manifest, shard: ShardInfo) -> tuple[np.ndarray, np.ndarray]:
    """Decode a per-sample shard with webdataset: (images uint8 [n,C,H,W], labels int64 [n]). Slow path."""
    import webdataset as wds

    c = m.shape[0]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(c, "RGB")
    xs, ys = [], []
    try:
        for sample in wds.WebDataset(str(m.root / shard.name), shardshuffle=False, empty_check=False).decode("pil"):
            img = next((sample[k] for k in IMAGE_EXTS if k in sample), None)
            if img is None:
                continue
            lab = next((sample[k] for k in LABEL_EXTS if k in sample), -1)
            arr = np.asarray(img.convert(mode))
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(int(lab.decode() if isinstance(lab, bytes) else lab))
    except Exception as err:  # webdataset re-raises tar and decode errors as many types
        raise UserError(f"shard {m.root / shard.name} is unreadable ({type(err).__name__}: {err})") from None
    if len(xs) != shard.num_samples:
        raise UserError(f"shard {m.root / shard.name} yielded {len(xs)} samples, expected {shard.num_samples}")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)
