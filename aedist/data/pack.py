"""Orchestration behind ``python launch/pack.py DATASET --out shards/NAME``: read, select, split, write.

    pack("fashion-mnist", "shards/fashion4", classes=[1, 3, 5, 8])   # seed 000's four classes
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aedist.data import sources
from aedist.data.shards import Manifest, write_shards
from aedist.errors import UserError

DATASETS = ("fashion-mnist", "mnist", "colored-mnist", "stl10", "folder")


def read_dataset(dataset: str, source: str | None = None, *, base: str = "mnist", size: int = 96,
                 unlabeled: bool = False, color_seed: int = 0) -> sources.RawDataset:
    """The raw dataset named on the command line (images uint8 [N,C,H,W], labels, class names)."""
    if dataset in ("fashion-mnist", "mnist"):
        return sources.read_idx_dataset(dataset, source)
    if dataset == "colored-mnist":
        return sources.colorize(sources.read_idx_dataset(base, source), seed=color_seed)
    if dataset == "stl10":
        if source is None:
            raise UserError("stl10 needs --source DIR holding stl10_binary/ (torchvision.datasets.STL10(DIR, download=True) makes it)")
        return sources.read_stl10(source, unlabeled=unlabeled)
    if dataset == "folder":
        if source is None:
            raise UserError("folder needs --source DIR with one sub-folder of images per class")
        return sources.read_folder(source, size)
    raise UserError(f"unknown dataset '{dataset}' (known: {', '.join(DATASETS)})")


def pack(
    dataset: str,
    out: str | Path,
    *,
    source: str | None = None,
    base: str = "mnist",
    classes: list[int] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    size: int = 96,
    unlabeled: bool = False,
    samples_per_block: int = 1024,
    blocks_per_shard: int = 64,
    force: bool = False,
    progress: bool = True,
) -> Manifest:
    """Read ``dataset``, keep ``classes`` (remapped to 0..k-1), carve val from train, write shards to ``out``."""
    raw = read_dataset(dataset, source, base=base, size=size, unlabeled=unlabeled, color_seed=seed)
    if classes:
        raw = sources.select_classes(raw, classes)
    raw = sources.carve_val(raw, val_fraction, seed)
    desc: dict[str, Any] = {**raw.source, "dataset": dataset}
    if dataset == "colored-mnist":
        desc["base"] = base
    return write_shards(out, raw.splits, raw.classes, samples_per_block=samples_per_block, blocks_per_shard=blocks_per_shard,
                        seed=seed, source=desc, force=force, progress=progress)
