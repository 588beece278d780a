"""Train an autoencoder from a config.

    accelerate launch launch/train.py --config configs/seeds/fashion_rotated.yaml [key=value ...]
    python launch/train.py --config configs/debug.yaml [key=value ...]       # one process
    python launch/train.py --config configs/seeds/fashion_rotated.yaml --debug     # a few steps, anomaly checks
    python launch/train.py --config configs/debug.yaml --import examples/aeparts.py model.name=tiny_mlp_ae  # your own parts

--import (repeatable, like the config's ``imports:``) imports a module (my_project.aeparts) or a .py file
(relative to the current folder) before the config's names are checked; config.yaml records it and a
resume repeats it.

Exit codes: 0 done, 2 bad input (one line on stderr), 75 preempted with a checkpoint saved (requeue me),
130 interrupted (Ctrl-C) with a checkpoint saved, 1 training diverged (non-finite loss; the last good
checkpoint is kept), 74 a checkpoint could not be written (disk full; older checkpoints are kept),
124 a rank did not arrive at a collective within train.collective_timeout_s (the newest checkpoint is kept).
Under ``accelerate launch`` these are each worker's codes; the launcher itself exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from aedist.signals import STOP

STOP.install()  # before anything slow: a signal during start-up is a stop request, not a kill

from aedist import config  # noqa: E402
from aedist.errors import PEER_LOST_EXIT, collective_failure, leave, run_cli, say_once  # noqa: E402
from aedist.loading import load_config  # noqa: E402
from aedist.sweeps import sweep_args  # noqa: E402

DEBUG_OVERRIDES = ["data.limit=512", "train.max_steps=8", "train.epochs=1", "log.wandb=offline", "log.every=1"]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (holds only what differs from the defaults)")
    parser.add_argument("--debug", action="store_true", help="tiny subset, a few steps, W&B offline, anomaly detection")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a module (my_project.aeparts) or a .py file (./aeparts.py) first, so its registrations count; repeatable")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3 optim.lr=3e-4")
    args = parser.parse_intermixed_args(argv)  # `--import X` may come after overrides (slurm/train.sbatch appends them)
    args.config, overrides = sweep_args(args.config, list(args.overrides))
    if args.debug:  # only the name: the schema alone, no imports needed
        overrides = DEBUG_OVERRIDES + [f"run.name={config.load_config(args.config, overrides).run.name}-debug"] + overrides
    cfg = load_config(args.config, overrides, args.imports)

    import torch

    from aedist.checkpoint import CheckpointError
    from aedist.engine import Diverged, train

    if args.debug:
        torch.autograd.set_detect_anomaly(True)
    try:
        code = train(cfg, debug=args.debug)
    except Diverged as err:
        say_once(f"error: {err}")  # every rank stops together with the same line: printed once
        code = 1
    except CheckpointError as err:  # the disk is full or gone: not the user's input, not divergence
        say_once(f"error: {err}")
        code = 74
    except RuntimeError as err:  # a collective that failed because of another rank: one line, not a gloo traceback
        found = collective_failure(err, cfg.train.collective_timeout_s)
        if found is None:
            raise
        line, code = found
        say_once(line, to_agent=code != PEER_LOST_EXIT)  # a rank that only lost its peer is never the root cause
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is saved, flushed and closed by now. A rank of a finished multi-process run
        # sometimes aborted in torch's exit-time C++ destructors ("terminate called without an active
        # exception", SIGABRT), turning success into a failed job; leave without running them.
        leave(code)
    return code


if __name__ == "__main__":
    run_cli(main)
