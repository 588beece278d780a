"""A 96x96 photo stand-in for STL10 where it cannot be downloaded (no internet on the build machines).

    python -m aedist.data.standins data/photo96 [N_TRAIN N_TEST]   # writes data/photo96/{train,test}/{china,flower}/*.png
    python launch/pack.py folder --source data/photo96 --size 96 --out shards/photo96

Random crops of the two photographs scikit-learn ships (427x640 each), at random scales and
flips: natural-image statistics at STL10's size, written as an ImageFolder tree so that the
``folder`` packer reads them like any user's images. Train and test crops come from disjoint
halves of each photo (left / right), so test crops are unseen pixels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_photo_crops(out: str | Path, n_train: int = 2000, n_test: int = 400, size: int = 96, seed: int = 0) -> Path:
    """Write ``n_train`` / ``n_test`` PNG crops per split (half per photo) under ``out``; returns ``out``."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    out = Path(out)
    for split, n, half in (("train", n_train, 0), ("test", n_test, 1)):
        for photo, path in zip(photos.images, photos.filenames):
            name = Path(path).stem
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            h, w, _ = photo.shape
            region = photo[:, : w // 2] if half == 0 else photo[:, w // 2:]
            for i in range(n // 2):
                side = int(rng.integers(size, min(h, w // 2)))  # scale jitter: 96 px up to the region's height
                top, left = rng.integers(0, h - side + 1), rng.integers(0, region.shape[1] - side + 1)
                crop = Image.fromarray(region[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop.save(folder / f"{i:05d}.png")
    return out


if __name__ == "__main__":
    # python -m aedist.data.standins OUT [N_TRAIN N_TEST]
    args = sys.argv[1:]
    print(write_photo_crops(args[0] if args else "data/photo96", *(int(a) for a in args[1:3])))
