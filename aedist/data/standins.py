"""A 96x96 photo stand-in for STL10 where it cannot be downloaded (no internet on the build machines).

    python -m aedist.data.standins data/photo96 [N_TRAIN N_VAL N_TEST [SIZE]]   # data/photo96/{train,val,test}/<photo>/*.png
    python launch/pack.py folder --source data/photo96 --size 96 --out shards/photo96

Random crops, at random scales and flips, of every natural photograph the installed packages ship:
the two scikit-learn bundles (china, flower; 640x427) and, where Debian's ``mate-backgrounds`` is
installed (``apt-get install mate-backgrounds``), its twelve nature photographs (sand, water, flowers,
insects, wood, sky ...; scaled to 640 px on the long side first, so that a crop covers as much of a
scene as in the sklearn ones). Natural-image statistics at STL10's size, written as an ImageFolder
tree (one class per photograph) that the ``folder`` packer reads like any user's images. Train, val
and test crops come from disjoint vertical strips of each photo (left half / third quarter / last
quarter), so neither model selection on val nor the test score ever sees a training pixel (the
packer keeps a val folder as it is).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Each split's strip of the photo's width, as fractions: disjoint, and each wider than the 96 px crops.
STRIPS = {"train": (0.0, 0.5), "val": (0.5, 0.75), "test": (0.75, 1.0)}
PHOTO_DIRS = ("/usr/share/backgrounds/mate/nature",)  # Debian's mate-backgrounds: photographs, not drawings
LONG_SIDE = 640  # the sklearn photographs' long side; larger photographs are scaled down to it


def _strip(width: int, split: str) -> tuple[int, int]:
    """The pixel columns [lo, hi) of ``split``'s strip of a photo ``width`` pixels wide."""
    lo, hi = STRIPS[split]
    return int(lo * width), int(hi * width)


def photographs(dirs: Sequence[str | Path] = PHOTO_DIRS) -> dict[str, np.ndarray]:
    """{name: HxWx3 uint8} of the sklearn photographs plus every JPEG in ``dirs`` that exists, sorted by name."""
    from sklearn.datasets import load_sample_images

    bundled = load_sample_images()
    photos = {Path(f).stem: img for f, img in zip(bundled.filenames, bundled.images)}
    for d in map(Path, dirs):
        for f in sorted(d.glob("*.jpg")) if d.is_dir() else []:
            with Image.open(f) as img:
                img = img.convert("RGB")
                scale = LONG_SIDE / max(img.size)
                if scale < 1:
                    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
                photos[f.stem.lower()] = np.asarray(img)
    return dict(sorted(photos.items()))


def write_photo_crops(out: str | Path, n_train: int = 2000, n_val: int = 200, n_test: int = 400, size: int = 96, seed: int = 0,
                      dirs: Sequence[str | Path] = PHOTO_DIRS) -> Path:
    """Write ``n_train`` / ``n_val`` / ``n_test`` PNG crops (spread evenly over the photographs) under ``out``."""
    def fits(photo: np.ndarray) -> bool:  # every split's strip holds a crop
        return all(min(photo.shape[0], hi - lo) >= size for lo, hi in (_strip(photo.shape[1], split) for split in STRIPS))

    photos = {k: v for k, v in photographs(dirs).items() if fits(v)}
    rng = np.random.default_rng(seed)
    out = Path(out)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for k, (name, photo) in enumerate(photos.items()):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            h, w, _ = photo.shape
            lo, hi = _strip(w, split)
            region = photo[:, lo:hi]
            for i in range(n // len(photos) + (k < n % len(photos))):
                side = int(rng.integers(size, min(h, hi - lo) + 1))  # scale jitter: 96 px up to the strip's size
                top, left = rng.integers(0, h - side + 1), rng.integers(0, region.shape[1] - side + 1)
                crop = Image.fromarray(region[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop.save(folder / f"{i:05d}.png")
    return out


def main(argv: Sequence[str], dirs: Sequence[str | Path] = PHOTO_DIRS) -> Path:
    """``OUT [N_TRAIN N_VAL N_TEST [SIZE]]``: write the crops and say which photographs they come from."""
    missing = [str(d) for d in dirs if not Path(d).is_dir()]
    if missing:
        # the study's photo stand-ins (photo96, photo500) are crops of 14 photographs; two give another dataset
        print(f"note: {', '.join(missing)} is absent, so the crops come from the 2 scikit-learn photographs only; "
              "apt-get install mate-backgrounds adds the 12 the seed study's photo stand-ins use", file=sys.stderr)
    out = write_photo_crops(argv[0] if argv else "data/photo96", *(int(a) for a in argv[1:5]), dirs=dirs)
    print(f"{out}: crops of {len(list((out / 'train').iterdir()))} photographs")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
