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
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tqdm import tqdm

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
    """One call per log: W&B/TensorBoard via Accelerate, plus metrics.jsonl and figures/*.png.

    A tracker that fails, however it fails (a send raises, W&B's service process died, so a send would
    vanish without an error), is dropped with one warning line on stderr and recorded in :meth:`health`;
    the local mirrors never depend on it."""

    def __init__(self, accelerator: Accelerator, cfg: Config, run_id: str) -> None:
        self.accelerator = accelerator
        self.run_dir = cfg.run_dir
        self.run_id = run_id
        self.enabled = accelerator.is_main_process
        self.lost: dict[str, int] = {}  # tracker name -> step from which it may hold nothing (see _lose)
        self.last_step = 0
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
        self.last_step = step
        for tracker in self._live(step):
            self._send(tracker, step, lambda t=tracker: t.log(clean, step=step))

    def log_images(self, images: dict[str, np.ndarray], step: int, epoch: int) -> None:
        """Figures as ``figures/KEY_epochEEE.png`` and as W&B images under KEY."""
        if not self.enabled or not images:
            return
        for key, array in images.items():
            save_png(array, self.run_dir / "figures" / f"{key.removeprefix('figures/').replace('/', '_')}_epoch{epoch:03d}.png")
        self.last_step = max(self.last_step, step)
        for tracker in self._live(step):
            if tracker.name == "wandb":
                self._send(tracker, step, lambda t=tracker: t.log_images({k: [v] for k, v in images.items()}, step=step))

    def health(self) -> dict[str, Any]:
        """``{"tracker_lost": {NAME: STEP}}`` for summary.json: each tracker lost during the run and the step
        from which it may hold nothing; empty when every tracker is still there (checked now, so a W&B
        service that died after the last log call is counted too)."""
        if self.enabled:
            self._live(self.last_step)
        return {"tracker_lost": dict(self.lost)}

    def _live(self, step: int) -> list[GeneralTracker]:
        """The trackers still worth sending to. A W&B whose service process is gone is dropped here,
        before the send: a send to a dead service may be queued and lost without any error."""
        live = []
        for tracker in self.accelerator.trackers:
            if tracker.name in self.lost:
                continue
            if tracker.name == "wandb" and (why := _wandb_gone(tracker.tracker)):
                self._lose(tracker.name, step, why)
                continue
            live.append(tracker)
        return live

    def _send(self, tracker: GeneralTracker, step: int, send: Callable[[], object]) -> None:
        """One send; its failure drops that tracker only. A preemption signals every process of the SLURM
        step, W&B's service included, a moment before the trainer reaches the step where it saves; a
        log call in between must not crash the rank (and with it the save every rank is about to make)."""
        try:
            send()
        except Exception as err:  # noqa: BLE001 - wandb raises ConnectionResetError, BrokenPipeError, its own errors
            self._lose(tracker.name, step, f"{type(err).__name__}: {err}")

    def _lose(self, name: str, step: int, why: str) -> None:
        """Record and report a lost tracker once. ``step`` is the first step it may lack: the send at that
        step did not reach it, and what its service had not written yet died with it."""
        self.lost[name] = step
        cause = " ".join(why.split())[:200]
        # tqdm.write: on a line of its own, not glued to the progress bar that shares stderr
        tqdm.write(f"warning: the trackers failed: {name} is lost from step {step} ({cause}); {self.run_dir / 'metrics.jsonl'} "
                   f"and figures/ stay complete, and summary.json records it as tracker_lost", file=sys.stderr)
        if name == "wandb":
            _drop_wandb(self.accelerator.get_tracker("wandb", unwrap=True))

    def close(self) -> None:
        """Flush and finish the trackers (all ranks may call it; only the main process has any). Never
        raises: on a preemption SLURM signals every process of the step, W&B's service included, and a
        failed flush must not turn a saved checkpoint into a crash (the offline run files are already on disk)."""
        for tracker in self._live(self.last_step) if self.enabled else []:  # finishing a lost W&B run can only fail
            try:
                tracker.finish()
            except Exception as err:  # noqa: BLE001 - any tracker failure at shutdown is only reported
                print(f"warning: closing {tracker.name} failed ({type(err).__name__}: {err})", file=sys.stderr, flush=True)
        try:
            self.accelerator.state.destroy_process_group()  # what Accelerator.end_training does after the trackers
        except Exception as err:  # noqa: BLE001 - reported, never raised (see above)
            print(f"warning: closing the process group failed ({type(err).__name__}: {err})", file=sys.stderr, flush=True)


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


def _drop_wandb(run: Any) -> None:
    """Let go of a W&B service that is gone. The run's console capture stops first: it forwards every
    write to stdout/stderr (the progress bar's included) to the dead socket, and asyncio then logs
    "socket.send() raised exception." lines. wandb.teardown() unregisters wandb's own exit hook (which
    would print a traceback at exit talking to the dead service) before its farewell message fails."""
    import wandb

    try:
        stop_console = getattr(run, "_console_stop", None)  # wandb internals; absent -> only the noise stays
        if stop_console is not None:
            stop_console()
    except Exception:  # noqa: BLE001, S110 - best effort: the run is lost either way
        pass
    try:
        wandb.teardown()
    except (Exception, SystemExit):  # noqa: BLE001, S110 - the farewell to a dead service fails, or exits with its code
        pass


def _wandb_gone(run: Any) -> str | None:
    """Why W&B's service can no longer take records, or None while it can; no round trip to the service.

    wandb hands each record to its service process (wandb-core) over a socket and does not wait for it.
    Its client closes its mailbox when that socket reaches EOF (the service died: the kernel closes the
    socket at once) and keeps the error of a failed write; the service process we started can be polled.
    These are wandb internals (checked against wandb 0.2x-0.31): a version without them reads as alive,
    and a send that raises is still caught by the caller."""
    client = getattr(getattr(run, "_interface", None), "_client", None)
    if getattr(getattr(client, "_mailbox", None), "_closed", False):
        return "its connection to W&B's service process was closed"
    if (broken := getattr(client, "_broken_exc", None)) is not None:
        return f"writing to W&B's service failed: {type(broken).__name__}"
    try:
        from wandb.sdk import wandb_setup

        setup = wandb_setup._singleton
        process = getattr(getattr(getattr(setup, "_connection", None), "_proc", None), "_process", None)
        code = process.poll() if process is not None else None
    except Exception:  # noqa: BLE001 - an unknown wandb layout: rely on the send raising
        code = None
    return None if code is None else f"W&B's service process exited with {code}"
