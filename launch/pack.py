"""Pack a dataset into block shards: ``python launch/pack.py DATASET --out shards/NAME [options]``.

    python launch/pack.py fashion-mnist --out shards/fashion4 --classes 1,3,5,8
    python launch/pack.py colored-mnist --base mnist --source data/mnist --out shards/cmnist
    python launch/pack.py stl10 --source data --out shards/stl10
    python launch/pack.py folder --source photos/ --size 96 --out shards/photos --workers 8   # flat CLASS/ tree: val and test carved
    python launch/pack.py folder --source photos/ --out shards/photos --task-index 3 --task-count 16   # one array task
    python launch/pack.py folder --source photos/ --out shards/photos --finish   # after the array: verify, write the manifest

A folder is streamed: decoded by --workers processes, written block by block, resumable (run the same
command again after a kill), and split over array tasks (slurm/pack.sbatch with sbatch --array=0-K).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aedist.data.pack import DATASETS, TEST_FRACTION, default_workers, pack
from aedist.errors import UserError, run_cli


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--classes {text!r}: expected comma-separated class ids, e.g. 1,3,5,8") from None


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--out", required=True, help="shards folder to write, e.g. shards/fashion4")
    p.add_argument("--source", help="folder with the raw files (default: system copy, else download)")
    p.add_argument("--base", default="mnist", choices=("mnist", "fashion-mnist"), help="grayscale base of colored-mnist")
    p.add_argument("--classes", type=str, default="", help="class ids to keep, remapped to 0..k-1, e.g. 1,3,5,8")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of train carved into val")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                   help="folder without a test/ split (a flat class tree): fraction of train carved into test")
    p.add_argument("--seed", type=int, default=0, help="seed of the val and test splits, pack shuffle and colours")
    p.add_argument("--size", type=int, default=96, help="image side for folder datasets")
    p.add_argument("--unlabeled", action="store_true", help="stl10: also pack the 100k unlabeled images (label -1)")
    p.add_argument("--samples-per-block", type=int, default=1024)
    p.add_argument("--blocks-per-shard", type=int, default=64)
    p.add_argument("--force", action="store_true", help="overwrite a folder that holds another dataset")
    p.add_argument("--workers", type=int, default=0, help=f"folder: decoding processes, this one included (default: the CPUs available, here {default_workers()})")
    p.add_argument("--on-error", default="skip", choices=("skip", "raise"),
                   help="folder: leave out unreadable images, counted and named in the log (skip), or stop with exit 2 (raise)")
    p.add_argument("--task-index", type=int, default=0, help="array packing: this task's index (slurm/pack.sbatch sets it)")
    p.add_argument("--task-count", type=int, default=1, help="array packing: number of tasks; each packs its own range of shards")
    p.add_argument("--finish", action="store_true",
                   help="array packing's final step: pack nothing, verify every shard (sha256) and write manifest.json if no task did; "
                        "exit 2 naming the shards still missing")
    a = p.parse_args(argv)
    m = pack(a.dataset, a.out, source=a.source, base=a.base, classes=_ints(a.classes), val_fraction=a.val_fraction,
             test_fraction=a.test_fraction,
             seed=a.seed, size=a.size, unlabeled=a.unlabeled, samples_per_block=a.samples_per_block,
             blocks_per_shard=a.blocks_per_shard, force=a.force, workers=a.workers or None, on_error=a.on_error,
             task_index=a.task_index, task_count=a.task_count, finish_only=a.finish)
    if m is not None:
        counts = ", ".join(f"{k} {v.num_samples}" for k, v in m.splits.items())
        print(f"{a.out}: {counts} samples of shape {list(m.shape)}, classes {m.classes}")
    return 0


if __name__ == "__main__":
    run_cli(main)
