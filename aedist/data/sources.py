"""Readers of raw datasets: each returns uint8 images [N, C, H, W], int64 labels [N] and class names.

    raw = read_idx_dataset("fashion-mnist")             # /usr/share/datasets/fashion-mnist, else download
    raw = read_stl10("data/stl10_binary", unlabeled=True)
    raw = read_folder("photos/", size=96)               # photos/CLASS/*.png or photos/{train,test}/CLASS/*
    listing = list_folder("photos/")                    # the same files, not decoded (the streaming packer's input)
    raw = colorize(read_idx_dataset("mnist"), seed=0)   # Colored MNIST, 3 channels
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from einops import rearrange

from aedist.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

Split = tuple[np.ndarray, np.ndarray]

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
SYSTEM_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FOLDER_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Colored MNIST: one base colour per class (RGB in [0, 1]), jittered per image.
PALETTE = np.array([
    [0.90, 0.10, 0.10], [0.10, 0.70, 0.10], [0.15, 0.30, 0.95], [0.95, 0.85, 0.10], [0.85, 0.15, 0.85],
    [0.10, 0.85, 0.85], [0.95, 0.55, 0.10], [0.55, 0.25, 0.95], [0.60, 0.95, 0.35], [0.95, 0.45, 0.60],
], dtype=np.float32)


@dataclass
class RawDataset:
    splits: dict[str, Split]
    """``{split: (images uint8 [N,C,H,W], labels int64 [N])}``; unlabeled samples carry label -1."""
    classes: list[str]
    source: dict[str, Any] = field(default_factory=dict)
    """What was read (dataset, folder, options): stored in the manifest to tell datasets apart."""


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (gzip or raw): magic 0x0000 TT NN, NN big-endian int32 dims, then the data."""
    p = Path(path)
    with (gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")) as fh:
        data = fh.read()
    if len(data) < 4 or data[0] or data[1] or data[2] not in IDX_DTYPES:
        raise UserError(f"{p} is not an IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(IDX_DTYPES[data[2]])
    body = 4 + 4 * ndim
    if len(data) - body != int(np.prod(dims)) * dtype.itemsize:
        raise UserError(f"{p} is truncated: header says {tuple(dims)}, found {len(data) - body} data bytes")
    return np.frombuffer(data, dtype, offset=body).reshape(tuple(dims))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for sub in ("", "raw", "FashionMNIST/raw", "MNIST/raw"):
        for name in (stem, stem + ".gz"):
            if (folder / sub / name).is_file():
                return folder / sub / name
    return None


def read_idx_dataset(name: str, source: str | Path | None = None, *, download_root: str | Path | None = None) -> RawDataset:
    """MNIST or Fashion-MNIST train/test from ``source``, else the system folder, else torchvision's download."""
    if name not in ("mnist", "fashion-mnist"):
        raise UserError(f"unknown IDX dataset '{name}' (known: mnist, fashion-mnist)")
    candidates = [Path(source)] if source else [Path(SYSTEM_DIRS[name])]
    folder = next((c for c in candidates if _find_idx(c, IDX_FILES["train"][0])), None)
    if folder is None and source:
        raise UserError(f"no {name} IDX files (train-images-idx3-ubyte[.gz] …) in --source {source}")
    if folder is None:
        folder = _download(name, Path(download_root or os.path.expanduser("~/.cache/aedist")))
    splits = {}
    for split, (img_stem, lab_stem) in IDX_FILES.items():
        img_path, lab_path = _find_idx(folder, img_stem), _find_idx(folder, lab_stem)
        if img_path is None or lab_path is None:
            raise UserError(f"{folder} lacks {img_stem} or {lab_stem} (.gz or raw)")
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or len(images) != len(labels):
            raise UserError(f"{img_path}: expected [N,H,W] images matching {len(labels)} labels, got {images.shape}")
        splits[split] = (np.ascontiguousarray(images[:, None]), labels.astype(np.int64))
    classes = FASHION_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    return RawDataset(splits, list(classes), {"dataset": name, "path": str(folder.resolve())})


def _download(name: str, root: Path) -> Path:  # pragma: no cover - needs internet (users' machines only)
    """Fetch with torchvision into ``root``; returns the folder holding the raw IDX files."""
    from torchvision import datasets

    cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as err:  # URLError, HTTP errors, checksum failures: all mean "give me --source"
        raise UserError(f"could not download {name} ({type(err).__name__}: {err}); pass --source DIR holding its IDX files") from None
    return root / cls.__name__ / "raw"


def read_stl10(source: str | Path, *, unlabeled: bool = False) -> RawDataset:
    """STL10 binary layout (torchvision's ``stl10_binary/``): train, test and optionally unlabeled.

    Each ``*_X.bin`` holds images as uint8 [N, 3, 96, 96] stored column-major per channel (Matlab
    order), so it is read as [N, C, W, H] and transposed; ``*_y.bin`` holds labels 1..10 → 0..9.
    Unlabeled images get label -1. Images are memory-mapped: the 100k unlabeled images stay on disk.
    """
    folder = Path(source)
    if (folder / "stl10_binary").is_dir():
        folder = folder / "stl10_binary"
    if not (folder / "train_X.bin").is_file():
        raise UserError(f"no STL10 binary files (train_X.bin …) in {folder}; pass --source DIR holding stl10_binary/")
    splits: dict[str, Split] = {}
    for split in ("train", "test") + (("unlabeled",) if unlabeled else ()):
        x_path = folder / f"{split}_X.bin"
        if not x_path.is_file():
            raise UserError(f"{x_path} is missing")
        if x_path.stat().st_size % (3 * 96 * 96):
            raise UserError(f"{x_path} is truncated (size not a multiple of 3*96*96)")
        raw = np.memmap(x_path, dtype=np.uint8, mode="r")
        images = rearrange(raw.reshape(-1, 3, 96, 96), "n c w h -> n c h w")  # a view; copied per block at pack time
        if split == "unlabeled":
            labels = np.full(len(images), -1, dtype=np.int64)
        else:
            labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
            if len(labels) != len(images) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
                raise UserError(f"{folder / f'{split}_y.bin'}: expected {len(images)} labels in 1..10")
        splits[split] = (images, labels)
    names_file = folder / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else list(STL10_CLASSES)
    return RawDataset(splits, classes, {"dataset": "stl10", "path": str(folder.resolve()), "unlabeled": unlabeled})


@dataclass
class FolderListing:
    """The image files of an ImageFolder tree in sorted order, with a hash of their names, sizes and mtimes."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    """``{split: [(path relative to root, class index), …]}``, classes in sorted order, files sorted by name."""
    sha256: str
    """Changes when a file is added, removed, renamed, resized or touched: tells one folder state from another."""


def _image_entries(folder: Path, broken: list[str]) -> list[os.DirEntry]:
    """The image files directly in ``folder``, sorted by name. A symbolic link that dangles or loops
    (``ln -s x.png x.png``) is appended to ``broken`` and left out; the walk never descends, so a link to a
    folder (``ln -s . loop``) cannot make it recurse."""
    try:
        entries = list(os.scandir(folder))
    except OSError as err:
        raise UserError(f"cannot read image folder {folder} ({err.strerror}); fix its permissions or remove it from --source") from None
    found = []
    for e in entries:
        if e.name.startswith(".") or os.path.splitext(e.name)[1].lower() not in FOLDER_EXTS:
            continue
        try:
            if e.is_file():  # follows a link; raises for a link loop (ELOOP), False for a dangling one
                e.stat()
                found.append(e)
            elif e.is_symlink():
                broken.append(e.path)
        except OSError:
            broken.append(e.path)
    return sorted(found, key=lambda e: e.name)


def list_folder(source: str | Path) -> FolderListing:
    """List ``ROOT/CLASS/*`` (all train) or ``ROOT/{train,val,test}/CLASS/*`` images, sorted; no decoding.

    Files with an image suffix (FOLDER_EXTS, any case) count; hidden files (``.*``, e.g. macOS ``._x.jpg``) do not.
    Symbolic links that dangle or loop, and class folders that link back to the root or above it (a loop:
    ``ln -s .. CLASS``), are left out with one warning line counting them.
    """
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"image folder {root} not found; pass --source DIR with one sub-folder per class")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()} or {"train": root}
    above = {root.resolve(), *root.resolve().parents}
    broken: list[str] = []

    def is_class(d: Path) -> bool:
        if d.name.startswith(".") or not d.is_dir():  # is_dir is False for a looping link
            return False
        if d.is_symlink() and d.resolve() in above:  # reading it would list the tree again as one class
            broken.append(str(d))
            return False
        return True

    try:
        classes = sorted({d.name for sd in split_dirs.values() for d in sd.iterdir() if is_class(d)})
    except OSError as err:
        raise UserError(f"cannot read image folder {root} ({err.strerror}); fix its permissions") from None
    if not classes:
        raise UserError(f"{root} has no class sub-folders (expected ROOT/CLASS/image.png)")
    h = hashlib.sha256()
    splits: dict[str, list[tuple[str, int]]] = {}
    for split, sd in split_dirs.items():
        files = []
        for ci, c in enumerate(classes):
            if not (sd / c).is_dir() or str(sd / c) in broken:
                continue
            prefix = os.path.relpath(sd / c, root)
            for e in _image_entries(sd / c, broken):
                st = e.stat()
                rel = os.path.join(prefix, e.name)
                h.update(f"{split}\0{rel}\0{ci}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
                files.append((rel, ci))
        splits[split] = files
    if broken:
        print(f"warning: left out {len(broken)} symbolic link(s) in {root} that dangle or loop, e.g. {broken[0]}", file=sys.stderr, flush=True)
    return FolderListing(root, classes, splits, h.hexdigest())


# What the folder decoder does to pixels; part of a folder pack's source description, so a pack made by
# an older decoder is another dataset (re-packed with --force), never silently kept as "already packed".
# 1: PIL's convert(), which saturated 16-bit images to 0/255, dropped alpha and ignored EXIF orientation.
DECODE_VERSION = 2
_GREY16 = ("I;16", "I;16B", "I;16L", "I;16N")


def _composite(arr: np.ndarray, background: Literal["black", "white"]) -> np.ndarray:
    """[H, W, C+1] colour + straight alpha (uint8) -> [H, W, C] over an opaque black or white background."""
    colour, alpha = arr[..., :-1].astype(np.uint32), arr[..., -1:].astype(np.uint32)
    under = 0 if background == "black" else 255 * (255 - alpha)
    return ((colour * alpha + under + 127) // 255).astype(np.uint8)  # rounded; c*a/255 never ends in .5


def to_8bit(img: Image.Image, channels: int, background: Literal["black", "white"] = "black") -> Image.Image:
    """Any mode a user's folder may hold as an 8-bit ``L`` (channels=1) or ``RGB`` (channels=3) image.

    PIL's own ``convert`` clips 16- and 32-bit values to 0..255 (a 16-bit PNG becomes black and white) and
    drops alpha, keeping whatever colour transparent pixels happen to store; instead:

    - 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``): scaled by 255/65535, rounded;
    - 32-bit integer ``I`` (TIFF, old Pillow's 16-bit PNG): read as 16-bit, so its values must lie in
      0..65535 (else ValueError: the range is unknown, convert the file to 8 or 16 bits);
    - 32-bit float ``F`` (TIFF): assumed in [0, 1], clipped to it (NaN -> 0), times 255, rounded;
    - alpha (``RGBA``, ``LA``, ``PA``, and ``P`` with a transparent palette entry): composited over an
      opaque ``background``, black by default (a transparent pixel is 0, like the empty background
      of MNIST-style data);
    - ``CMYK``: R = (255 - C)(255 - K)/255 (likewise G, B), rounded, whatever Pillow version;
    - ``1``, ``P``, ``L``, ``RGB``, ``YCbCr`` …: Pillow's conversion (exact for these).

    Grey becomes RGB by repeating it; RGB becomes grey by ITU-R 601 luma (Pillow's ``L``). 16-bit RGB
    PNGs arrive from Pillow already as 8-bit ``RGB`` (the high byte of each value).
    """
    from PIL import Image

    target = {1: "L", 3: "RGB"}[channels]
    mode = img.mode
    if mode in _GREY16 or mode == "I":
        a = np.asarray(img)  # honours the byte order of I;16B
        if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"32-bit integer image with values {a.min()}..{a.max()}, outside the 16-bit range 0..65535 "
                             "this packer assumes; convert it to 8 or 16 bits")
        img = Image.fromarray(((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), "L")  # exact rounding: no ties
    elif mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        img = Image.fromarray(np.rint(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8), "L")
    elif mode == "CMYK":
        a = np.asarray(img).astype(np.uint32)
        img = Image.fromarray((((255 - a[..., :3]) * (255 - a[..., 3:]) + 127) // 255).astype(np.uint8), "RGB")
    else:
        if mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode in ("PA", "RGBa", "RGBX"):
            img = img.convert("RGBA" if mode != "RGBX" else "RGB")
        elif mode == "La":
            img = img.convert("LA")
        if img.mode in ("RGBA", "LA"):
            img = Image.fromarray(_composite(np.asarray(img), background).squeeze(-1) if img.mode == "LA"
                                  else _composite(np.asarray(img), background), img.mode[:-1])
    return img if img.mode == target else img.convert(target)


def load_image(path: str | Path, size: int, channels: int = 3, background: Literal["black", "white"] = "black") -> np.ndarray:
    """Decode one image to uint8 [channels, size, size]: turned upright by its EXIF orientation, converted
    to 8 bits by :func:`to_8bit` (16-bit, float, alpha over ``background``, CMYK …), then the centred
    square of its shorter side, resized.

    JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, as ``Image.thumbnail`` does) when
    that still leaves at least ``size`` pixels per side: several times faster for photos much larger than
    ``size``. Raises whatever PIL raises for an unreadable file (UnidentifiedImageError, OSError for a
    truncated one, DecompressionBombError …) and ValueError for values out of the assumed range;
    callers decide whether to skip or stop.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.draft({1: "L", 3: "RGB"}[channels], (size, size))
        img.load()  # a truncated file fails here
        # A camera stores the sensor's pixels and an orientation tag; the image as shown is what to learn.
        img = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img
        img = to_8bit(img, channels, background)
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    arr = np.asarray(img.resize((size, size), Image.BILINEAR, box=box))
    return arr[None] if arr.ndim == 2 else rearrange(arr, "h w c -> c h w")


def read_folder(source: str | Path, size: int = 96, *, channels: int = 3) -> RawDataset:
    """An ImageFolder tree (see :func:`list_folder`) decoded into memory with :func:`load_image`.

    For small folders and notebooks; ``launch/pack.py folder`` streams through aedist.data.pack instead.
    An unreadable image raises UserError naming it.
    """
    listing = list_folder(source)
    splits: dict[str, Split] = {}
    for split, files in listing.splits.items():
        images = np.empty((len(files), channels, size, size), dtype=np.uint8)
        for i, (rel, _) in enumerate(files):
            try:
                images[i] = load_image(listing.root / rel, size, channels)
            except Exception as err:  # PIL raises many types for bad files
                raise UserError(f"unreadable image {listing.root / rel} ({type(err).__name__}: {err})") from None
        splits[split] = (images, np.array([ci for _, ci in files], dtype=np.int64))
    src = {"dataset": "folder", "path": str(listing.root.resolve()), "size": size, "channels": channels, "decode": DECODE_VERSION}
    return RawDataset(splits, listing.classes, src)


def colorize(raw: RawDataset, seed: int = 0, jitter: float = 0.15) -> RawDataset:
    """Colored MNIST from a grayscale dataset: pixel * (class base colour + per-image jitter), 3 channels.

    The jitter is drawn per image, uniform in ±``jitter`` per channel, from ``seed`` and the split
    name, so the same seed always gives the same colours.
    """
    splits: dict[str, Split] = {}
    for name, (x, y) in raw.splits.items():
        if x.shape[1] != 1:
            raise UserError(f"colorize needs grayscale images, got {x.shape[1]} channels")
        rng = np.random.default_rng([seed, sum(name.encode())])
        colour = PALETTE[np.mod(y, len(PALETTE))] + rng.uniform(-jitter, jitter, (len(y), 3)).astype(np.float32)
        colour = np.clip(colour, 0.0, 1.0)
        out = np.empty((len(x), 3, *x.shape[2:]), dtype=np.uint8)
        for i in range(0, len(x), 4096):  # chunked: bounded float32 temporaries
            gray = x[i : i + 4096].astype(np.float32)  # [n,1,H,W]
            out[i : i + 4096] = np.rint(gray * colour[i : i + 4096, :, None, None]).astype(np.uint8)
        splits[name] = (out, y)
    return RawDataset(splits, list(raw.classes), {**raw.source, "colorize": {"seed": seed, "jitter": jitter}})


def select_classes(raw: RawDataset, classes: list[int]) -> RawDataset:
    """Keep only ``classes`` (original ids), remapped to 0..k-1 in the given order; names kept."""
    bad = [c for c in classes if not 0 <= c < len(raw.classes)]
    if bad or len(set(classes)) != len(classes):
        raise UserError(f"--classes {','.join(map(str, classes))}: need distinct ids in 0..{len(raw.classes) - 1}")
    lut = np.full(len(raw.classes), -1, dtype=np.int64)
    lut[classes] = np.arange(len(classes))
    splits = {}
    for name, (x, y) in raw.splits.items():
        keep = (y >= 0) & np.isin(y, classes)
        splits[name] = (x[keep], lut[y[keep]])
    return RawDataset(splits, [raw.classes[c] for c in classes], {**raw.source, "classes": list(classes)})


def carve_val(raw: RawDataset, fraction: float, seed: int = 0) -> RawDataset:
    """Move a seeded random ``fraction`` of train into a new ``val`` split (if none exists yet)."""
    if not 0 <= fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or "val" in raw.splits or "train" not in raw.splits:
        return raw
    x, y = raw.splits["train"]
    perm = np.random.default_rng([seed, 1]).permutation(len(x))
    n_val = int(round(len(x) * fraction))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    splits = {**raw.splits, "train": (x[train], y[train]), "val": (x[val], y[val])}
    return RawDataset(splits, raw.classes, {**raw.source, "val_fraction": fraction, "val_seed": seed})
