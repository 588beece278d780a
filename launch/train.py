"""Train an autoencoder from a config.

    accelerate launch launch/train.py --config configs/seeds/fashion_rotated.yaml [key=value ...]
    python launch/train.py --config configs/debug.yaml [key=value ...]       # one process
    python launch/train.py --config configs/seeds/fashion_rotated.yaml --debug     # a few steps, anomaly checks

Exit codes: 0 done, 2 bad input (one line on stderr), 75 preempted with a checkpoint saved (requeue me),
1 training diverged (non-finite loss; the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aedist.config import load_config
from aedist.errors import run_cli
from aedist.sweeps import sweep_args

DEBUG_OVERRIDES = ["data.limit=512", "train.max_steps=8", "train.epochs=1", "log.wandb=offline", "log.every=1"]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (holds only what differs from the defaults)")
    parser.add_argument("--debug", action="store_true", help="tiny subset, a few steps, W&B offline, anomaly detection")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3 optim.lr=3e-4")
    args = parser.parse_args(argv)
    args.config, overrides = sweep_args(args.config, list(args.overrides))
    if args.debug:
        overrides = DEBUG_OVERRIDES + [f"run.name={load_config(args.config, overrides).run.name}-debug"] + overrides
    cfg = load_config(args.config, overrides)

    import torch

    from aedist.engine import Diverged, train

    if args.debug:
        torch.autograd.set_detect_anomaly(True)
    try:
        return train(cfg, debug=args.debug)
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    run_cli(main)
