"""The STL10 stand-in: three splits from disjoint strips of the photographs, read by the folder packer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aedist.data.sources import list_folder
from aedist.data.standins import LONG_SIDE, STRIPS, photographs, write_photo_crops


def test_splits_come_from_disjoint_strips_and_pack_as_their_own_splits(tmp_path: Path) -> None:
    bounds = sorted(STRIPS.values())
    assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:]))  # no pixel column in two splits
    out = write_photo_crops(tmp_path / "photo", n_train=4, n_val=2, n_test=2, size=32, dirs=())
    counts = {s: len(list((out / s).glob("*/*.png"))) for s in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 2, "test": 2}
    img = np.asarray(Image.open(next((out / "val").glob("*/*.png"))))
    assert img.shape == (32, 32, 3)
    listing = list_folder(out)
    assert set(listing.splits) == {"train", "val", "test"}  # the packer keeps val as it is (no carve from train)


def test_photographs_from_a_package_folder_join_the_bundled_ones(tmp_path: Path) -> None:
    """A folder of JPEGs (as Debian's mate-backgrounds installs) adds one class per photograph, scaled to LONG_SIDE."""
    bundled = photographs(dirs=())
    assert sorted(bundled) == ["china", "flower"]
    big = np.concatenate([bundled["china"], bundled["flower"]], axis=1)  # 427 x 1280: scaled down to 640 wide
    Image.fromarray(big).save(tmp_path / "Dune.jpg", quality=95)
    Image.fromarray(bundled["flower"][:50]).save(tmp_path / "Sliver.jpg")  # too short for a 32 px crop of every strip
    photos = photographs(dirs=[tmp_path, tmp_path / "absent"])
    assert list(photos) == ["china", "dune", "flower", "sliver"]
    assert photos["dune"].shape == (round(427 * LONG_SIDE / 1280), LONG_SIDE, 3)
    out = write_photo_crops(tmp_path / "photo", n_train=7, n_val=3, n_test=3, size=64, dirs=[tmp_path])
    per_class = {s: sorted((c.name, len(list(c.glob("*.png")))) for c in (out / s).iterdir()) for s in ("train", "val", "test")}
    assert per_class["train"] == [("china", 3), ("dune", 2), ("flower", 2)]  # spread evenly; the sliver left out
    assert per_class["val"] == per_class["test"] == [("china", 1), ("dune", 1), ("flower", 1)]


def test_the_command_says_when_the_package_photographs_are_absent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without mate-backgrounds the crops come from 2 photographs instead of the study's 14: said, not silent."""
    from aedist.data.standins import main

    main([str(tmp_path / "two"), "4", "2", "2", "32"], dirs=[tmp_path / "absent"])
    out, err = capsys.readouterr()
    assert "absent" in err and "apt-get install mate-backgrounds" in err and "crops of 2 photographs" in out
    Image.fromarray(photographs(dirs=())["flower"]).save(tmp_path / "Dune.jpg")
    main([str(tmp_path / "three"), "4", "2", "2", "32"], dirs=[tmp_path])
    out, err = capsys.readouterr()
    assert err == "" and "crops of 3 photographs" in out
