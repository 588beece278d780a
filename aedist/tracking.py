"""Experiment tracking: W&B (and optionally TensorBoard) through Accelerate's trackers, mirrored locally.

Every scalar log is also a line of ``runs/NAME/metrics.jsonl`` and every figure a PNG under
``runs/NAME/figures/``, so nothing depends on W&B being reachable. Only the main process writes.
The standard WANDB_* environment variables win over the config (WANDB_MODE, WANDB_PROJECT, ...).
TensorBoard gets what W&B gets: scalars, figures as images and the resolved config as text.
Checkpoints go to W&B as model artifacts when ``log.wandb_artifacts`` asks (:meth:`Tracker.log_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tqdm import tqdm

from aedist.config import Config
from aedist.errors import UserError
from aedist.visuals import save_png


def trackers_for(cfg: Config) -> list[str]:
    """Accelerate ``log_with`` names for this config."""
    names = [] if _wandb_mode(cfg) == "disabled" else ["wandb"]
    if cfg.log.tensorboard:
        _require_tensorboard()  # here: the Accelerator is built from this list before any data is read or any step taken
        names.append("tensorboard")
    return names


def _require_tensorboard() -> None:
    """One line instead of Accelerate's warning, after which the run would log nothing to TensorBoard.
    Accelerate's TensorBoard tracker imports torch.utils.tensorboard (which needs the tensorboard
    package), else tensorboardX; the same order here."""
    try:
        from torch.utils import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise UserError("log.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                            "or set log.tensorboard=false") from None


def _wandb_mode(cfg: Config) -> str:
    return os.environ.get("WANDB_MODE", cfg.log.wandb)


class _DeadSocketNoise(logging.Filter):
    """Drops asyncio's "socket.send() raised exception." lines. wandb's client writes to its service over
    a socket from an asyncio loop; once that service died, every write until the tracker notices (a race
    of a few ms, longer on a loaded machine) repeats this line. The death itself is reported once, by
    the tracker's own warning and :meth:`Tracker.health`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "socket.send() raised exception" not in record.getMessage()


_NOISE = _DeadSocketNoise()


def new_run_id() -> str:
    """A W&B-style run id (a sweep agent's WANDB_RUN_ID when set); stored in checkpoints so a
    resumed run continues the same W&B run."""
    return os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)


class Tracker:
    """One call per log: W&B/TensorBoard via Accelerate, plus metrics.jsonl and figures/*.png.

    A tracker that fails, however it fails (a send raises, W&B's service process died, so a send would
    vanish without an error), is dropped with one warning line on stderr and recorded in :meth:`health`;
    the local mirrors never depend on it."""

    def __init__(self, accelerator: Accelerator, cfg: Config, run_id: str, job_type: Literal["train", "evaluate"] = "train") -> None:
        """``job_type="evaluate"`` labels a W&B run of its own (a checkpoint without a W&B id); an evaluation
        that continues the training run's id leaves that run's job type "train" (a resumed run takes the
        job type it is given, and would be relabelled)."""
        self.accelerator = accelerator
        self.run_dir = cfg.run_dir
        self.run_id = run_id or new_run_id()
        self.run_name = os.environ.get("WANDB_NAME", cfg.run.name)
        which = cfg.log.wandb_artifacts
        self.artifacts: set[str] = {"best", "last"} if which == "both" else set() if which == "none" else {which}
        self.enabled = accelerator.is_main_process
        self.lost: dict[str, int] = {}  # tracker name -> step from which it may hold nothing (see _lose)
        self.last_step = 0
        if self.enabled:
            (self.run_dir / "figures").mkdir(parents=True, exist_ok=True)
        init_kwargs: dict[str, dict[str, Any]] = {}
        if "wandb" in trackers_for(cfg):
            if _NOISE not in logging.getLogger("asyncio").filters:
                logging.getLogger("asyncio").addFilter(_NOISE)
            init_kwargs["wandb"] = {
                "id": self.run_id,
                "resume": "allow",  # same id after a requeue -> the same W&B run continues
                "name": self.run_name,
                "dir": str(self.run_dir),
                "mode": _wandb_mode(cfg),
                "entity": os.environ.get("WANDB_ENTITY", cfg.log.entity),
                # one experiment's runs side by side: its training run (with evaluate.py's numbers) and any of its own
                "group": os.environ.get("WANDB_RUN_GROUP", cfg.log.group or cfg.run.name),
                "job_type": "train" if run_id else job_type,  # see the docstring: only a run of its own is "evaluate"
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
            if self.enabled and "tensorboard" in trackers_for(cfg):
                self._tensorboard_config(cfg)

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
        """Figures (HWC uint8) as ``figures/KEY_epochEEE.png`` and as W&B and TensorBoard images under KEY."""
        if not self.enabled or not images:
            return
        for key, array in images.items():
            save_png(array, self.run_dir / "figures" / f"{key.removeprefix('figures/').replace('/', '_')}_epoch{epoch:03d}.png")
        self.last_step = max(self.last_step, step)
        for tracker in self._live(step):
            if tracker.name == "wandb":
                self._send(tracker, step, lambda t=tracker: t.log_images({k: [v] for k, v in images.items()}, step=step))
            elif tracker.name == "tensorboard":  # Accelerate's log_images wants NCHW batches; a figure is one HWC image
                self._send(tracker, step, lambda t=tracker: _tensorboard_images(t.tracker, images, step))

    def log_checkpoint(self, folder: Path, step: int, which: Literal["best", "last"]) -> None:
        """The checkpoint ``folder`` as a version of the W&B model artifact ``NAME-model`` with alias ``best``
        or ``latest`` (and ``step-N``), when ``log.wandb_artifacts`` asks for ``which``. Holds its weights
        (model.safetensors) and the run's config.yaml, eval.json and summary.json where present.

        ``runs/NAME/artifacts.json`` records what was logged, so a requeued run that saves the same
        checkpoint again (a best replayed after a preemption, a finished run started again) does not log it twice."""
        if not self.enabled or which not in self.artifacts:
            return
        tracker = next((t for t in self._live(step) if t.name == "wandb"), None)
        record_path = self.run_dir / "artifacts.json"
        record: dict[str, list[int]] = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if tracker is None or step in record.get(which, []):
            return
        self._send(tracker, step, lambda: _log_model_artifact(tracker.tracker, self.run_dir, folder, step, which, self.run_name, self.run_id))
        if "wandb" in self.lost:  # not logged: a later start may try again
            return
        record.setdefault(which, []).append(step)
        tmp = record_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(record_path)  # whole or not at all: a half-written record would log everything again

    def _tensorboard_config(self, cfg: Config) -> None:
        """The resolved config (config.yaml as the trainer wrote it, with its resolved precision notes) as
        TensorBoard text; Accelerate's hparams table only holds the flat scalars."""
        path = self.run_dir / "config.yaml"
        text = path.read_text() if path.is_file() else yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        markdown = "\n".join("    " + line for line in text.splitlines())  # indented: TensorBoard renders text as Markdown
        for tracker in self._live(self.last_step):
            if tracker.name == "tensorboard":
                self._send(tracker, self.last_step, lambda t=tracker: _tensorboard_text(t.tracker, "config", markdown))

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


def _tensorboard_images(writer: Any, images: dict[str, np.ndarray], step: int) -> None:
    for key, array in images.items():
        writer.add_image(key, array, global_step=step, dataformats="HWC" if array.ndim == 3 else "HW")
    writer.flush()


def _tensorboard_text(writer: Any, tag: str, text: str) -> None:
    writer.add_text(tag, text, global_step=0)
    writer.flush()


def _log_model_artifact(run: Any, run_dir: Path, folder: Path, step: int, which: str, run_name: str, run_id: str) -> None:
    """One artifact version. add_file copies each file into W&B's staging folder (WANDB_DATA_DIR) at once:
    the checkpoint folder may be replaced ("best") or rotated away (keep_last) before the upload ends."""
    import wandb

    name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{run_name}-model")  # the characters W&B allows in artifact names
    artifact = wandb.Artifact(name, type="model", metadata={"step": step, "checkpoint": folder.name, "run_id": run_id})
    artifact.add_file(str(folder / "model.safetensors"))
    for extra in ("config.yaml", "eval.json", "summary.json"):
        if (run_dir / extra).is_file():
            artifact.add_file(str(run_dir / extra))
    run.log_artifact(artifact, aliases=["best" if which == "best" else "latest", f"step-{step}"])


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
