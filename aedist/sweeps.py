"""W&B sweep arguments: agents call ``launch/train.py ${args_no_hyphens}``, so everything arrives
as ``key=value`` and ``config=PATH`` picks the experiment file."""

from __future__ import annotations

import os

from aedist.config import load_config


def sweep_args(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``config=PATH`` out of the overrides; inside a sweep agent give each trial its own run
    folder (``run.name`` + the agent's WANDB_RUN_ID), else ``train.resume=auto`` would continue the
    previous trial."""
    config = next((o.split("=", 1)[1] for o in overrides if o.startswith("config=")), config)
    overrides = [o for o in overrides if not o.startswith("config=")]
    run_id = os.environ.get("WANDB_RUN_ID")
    if os.environ.get("WANDB_SWEEP_ID") and run_id:
        overrides.append(f"run.name={load_config(config, overrides).run.name}-{run_id}")
    return config, overrides
