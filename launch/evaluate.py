"""Evaluate a run's newest complete checkpoint: metrics to eval.json, figures to figures/ and W&B.

    python launch/evaluate.py runs/fashion_rotated [--split test|val|train] [--checkpoint best] [--weights auto|ema|raw] [--metrics M ...] [--import X]

The extensions the run imported (``imports`` in its config.yaml) are imported again; --import adds more.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aedist.errors import run_cli


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder made by launch/train.py (holds config.yaml and checkpoints/)")
    parser.add_argument("--split", default="test", choices=["test", "val", "train"],
                        help="split to measure; train: in eval mode, keyed train_eval/ (a generalization gap against val/), to eval_train.json")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder name (default: newest complete step-N)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B run")
    parser.add_argument("--limit", type=int, default=0, metavar="N",
                        help="score the split's first N images (manifest order), e.g. a sample of a large train split; recorded in the "
                             "eval file. The kNN is still fitted on eval.knn_train train images")
    parser.add_argument("--no-figures", action="store_true",
                        help="metrics only: no figures (their t-SNE and samples take minutes on a CPU), e.g. for a repeat run or a second checkpoint")
    parser.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                        help="auto = the EMA weights where the run kept them (train.ema_decay > 0), else raw")
    parser.add_argument("--metrics", nargs="+", default=[], metavar="NAME",
                        help="measure these besides the run's eval.metrics (e.g. variety ssim on a run trained without them)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="also import this module or .py file (the run's recorded imports are always imported); repeatable")
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error("--limit must be 0 (all) or a positive number of images")

    from aedist.evaluation.run import evaluate_run

    out = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint, wandb=not args.no_wandb, weights=args.weights,
                       imports=args.imports, extra_metrics=args.metrics, figures=not args.no_figures, limit=args.limit)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
