"""A 96x96 photo stand-in for STL10 where it cannot be downloaded (no internet on the build machines).

    python -m aedist.data.standins data/photo96 [N_TRAIN N_VAL N_TEST]   # data/photo96/{train,val,test}/{china,flower}/*.png
    python launch/pack.py folder --source data/photo96 --size 96 --out shards/photo96

Random crops of the two photographs scikit-learn ships (427x640 each), at random scales and
flips: natural-image statistics at STL10's size, written as an ImageFolder tree so that the
``folder`` packer reads them like any user's images. Train, val and test crops come from disjoint
vertical strips of each photo (left half / third quarter / last quarter), so neither model selection
on val nor the test score ever sees a training pixel (the packer keeps a val folder as it is).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Each split's strip of the photo's width, as fractions: disjoint, and each wider than the 96 px crops.
STRIPS = {"train": (0.0, 0.5), "val": (0.5, 0.75), "test": (0.75, 1.0)}


def write_photo_crops(out: str | Path, n_train: int = 2000, n_val: int = 200, n_test: int = 400, size: int = 96, seed: int = 0) -> Path:
    """Write ``n_train`` / ``n_val`` / ``n_test`` PNG crops (half per photo) under ``out``; returns ``out``."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    out = Path(out)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for photo, path in zip(photos.images, photos.filenames):
            name = Path(path).stem
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            h, w, _ = photo.shape
            lo, hi = (int(f * w) for f in STRIPS[split])
            region = photo[:, lo:hi]
            for i in range(n // 2):
                side = int(rng.integers(size, min(h, hi - lo) + 1))  # scale jitter: 96 px up to the strip's size
                top, left = rng.integers(0, h - side + 1), rng.integers(0, region.shape[1] - side + 1)
                crop = Image.fromarray(region[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop.save(folder / f"{i:05d}.png")
    return out


if __name__ == "__main__":
    # python -m aedist.data.standins OUT [N_TRAIN N_VAL N_TEST]
    args = sys.argv[1:]
    print(write_photo_crops(args[0] if args else "data/photo96", *(int(a) for a in args[1:4])))
