"""The STL10 stand-in: three splits from disjoint strips of the photographs, read by the folder packer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from aedist.data.sources import list_folder
from aedist.data.standins import STRIPS, write_photo_crops


def test_splits_come_from_disjoint_strips_and_pack_as_their_own_splits(tmp_path: Path) -> None:
    bounds = sorted(STRIPS.values())
    assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:]))  # no pixel column in two splits
    out = write_photo_crops(tmp_path / "photo", n_train=4, n_val=2, n_test=2, size=32)
    counts = {s: len(list((out / s).glob("*/*.png"))) for s in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 2, "test": 2}
    img = np.asarray(Image.open(next((out / "val").glob("*/*.png"))))
    assert img.shape == (32, 32, 3)
    listing = list_folder(out)
    assert set(listing.splits) == {"train", "val", "test"}  # the packer keeps val as it is (no carve from train)
