"""Experiment tracking: W&B (and optionally TensorBoard) through Accelerate's trackers, mirrored locally.

Every scalar log is also a line of ``runs/NAME/metrics.jsonl`` and every figure a PNG under
``runs/NAME/figures/``, so nothing depends on W&B being reachable. Only the main process writes.
The standard WANDB_* environment variables win over the config (WANDB_MODE, WANDB_PROJECT, ...).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np
from accelerate import Accelerator

from aedist.config import Config
from aedist.errors import UserError
from aedist.visuals import save_png


def trackers_for(cfg: Config) -> list[str]:
    """Accelerate ``log_with`` names for this config."""
    names = [] if _wandb_mode(cfg) == "disabled" else ["wandb"]
    return names + (["tensorboard"] if cfg.log.tensorboard else [])


def _wandb_mode(cfg: Config) -> str:
    return os.environ.get("WANDB_MODE", cfg.log.wandb)


def new_run_id() -> str:
    """A W&B-style run id (a sweep agent's WANDB_RUN_ID when set); stored in checkpoints so a
    resumed run continues the same W&B run."""
    return os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)


class Tracker:
    """One call per log: W&B/TensorBoard via Accelerate, plus metrics.jsonl and figures/*.png."""

    def __init__(self, accelerator: Accelerator, cfg: Config, run_id: str) -> None:
        self.accelerator = accelerator
        self.run_dir = cfg.run_dir
        self.run_id = run_id
        self.enabled = accelerator.is_main_process
        self.trackers_lost = False  # set by the first failed send (see _to_trackers)
        if self.enabled:
            (self.run_dir / "figures").mkdir(parents=True, exist_ok=True)
        init_kwargs: dict[str, dict[str, Any]] = {}
        if "wandb" in trackers_for(cfg):
            init_kwargs["wandb"] = {
                "id": run_id,
                "resume": "allow",  # same id after a requeue -> the same W&B run continues
                "name": os.environ.get("WANDB_NAME", cfg.run.name),
                "dir": str(self.run_dir),
                "mode": _wandb_mode(cfg),
                "entity": os.environ.get("WANDB_ENTITY", cfg.log.entity),
                "group": os.environ.get("WANDB_RUN_GROUP", cfg.log.group),
                "tags": cfg.log.tags or None,
            }
        if trackers_for(cfg):
            project = os.environ.get("WANDB_PROJECT", cfg.log.project)
            try:
                accelerator.init_trackers(project, config=_flat(cfg.to_dict()), init_kwargs=init_kwargs)
            except Exception as err:  # noqa: BLE001 - wandb raises UsageError/CommError/... for login and network
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise UserError(f"W&B could not start in mode {_wandb_mode(cfg)!r} ({first}); run `wandb login` or set "
                                "WANDB_API_KEY, or use log.wandb=offline and `wandb sync` later") from None

    def log(self, values: dict[str, float], step: int, epoch: int) -> None:
        """Scalars to every tracker and one JSON line; non-finite values are kept as strings in JSONL."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        row = {"step": step, "epoch": epoch, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as fh:  # the local record first: it must not depend on W&B
            fh.write(json.dumps(row) + "\n")
        self._to_trackers(lambda: self.accelerator.log(clean, step=step))

    def log_images(self, images: dict[str, np.ndarray], step: int, epoch: int) -> None:
        """Figures as ``figures/KEY_epochEEE.png`` and as W&B images under KEY."""
        if not self.enabled or not images:
            return
        for key, array in images.items():
            save_png(array, self.run_dir / "figures" / f"{key.removeprefix('figures/').replace('/', '_')}_epoch{epoch:03d}.png")
        if "wandb" in [t.name for t in self.accelerator.trackers]:
            self._to_trackers(lambda: self.accelerator.get_tracker("wandb").log_images({k: [v] for k, v in images.items()}, step=step))

    def _to_trackers(self, send: Callable[[], object]) -> None:
        """Send to W&B/TensorBoard unless they were lost. A preemption signals every process of the SLURM
        step, W&B's service included, a moment before the trainer reaches the step where it saves; a
        log call in between must not crash the rank (and with it the save every rank is about to make).
        So the first failure is reported in one line and the rest of this process logs locally only;
        the resumed attempt continues the same W&B run."""
        if self.trackers_lost:
            return
        try:
            send()
        except Exception as err:  # noqa: BLE001 - wandb raises ConnectionResetError, BrokenPipeError, its own errors
            self.trackers_lost = True
            print(f"warning: the trackers failed ({type(err).__name__}: {err}); this process logs to "
                  f"{self.run_dir / 'metrics.jsonl'} and figures/ only from here on", flush=True)
            _drop_wandb()

    def close(self) -> None:
        """Flush and finish the trackers (all ranks may call it). Never raises: on a preemption SLURM
        signals every process of the step, W&B's service included, and a failed flush must not turn
        a saved checkpoint into a crash (the offline run files are already on disk)."""
        try:
            if self.trackers_lost:  # finishing a lost W&B run can only fail; the process group still goes
                self.accelerator.state.destroy_process_group()
            else:
                self.accelerator.end_training()
        except Exception as err:  # noqa: BLE001 - any tracker failure at shutdown is only reported
            print(f"warning: closing the trackers failed ({type(err).__name__}: {err})", flush=True)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"optim.lr": 1e-3, ...}`` with lists/dicts as JSON strings for tracker configs."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "corruptions":
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def _drop_wandb() -> None:
    """Let go of a W&B service that is gone. wandb.teardown() unregisters wandb's own exit hook (which
    would print a traceback at exit talking to the dead service) before its farewell message fails."""
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001, S110 - the service is gone; the farewell is expected to fail
        pass
