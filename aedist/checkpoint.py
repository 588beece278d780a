"""Atomic checkpoints: Accelerate's state plus ours, in ``runs/NAME/checkpoints/step-N/``.

A checkpoint is written into ``.tmp-step-N/``, our ``state.json`` and then the ``COMPLETE`` marker
are written and flushed, and only then is the folder renamed into place. A crash at any point
leaves either the previous checkpoints untouched or a ``.tmp-*`` folder that nothing reads, so the
newest complete checkpoint is never corrupted. Checkpoint folders must sit on a filesystem every
rank can see (as on any multi-node cluster), since each rank writes its own RNG state there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from aedist.errors import UserError

MARKER = "COMPLETE"
STATE = "state.json"


@dataclass
class TrainState:
    """Our part of a checkpoint: where the data stream stands and what the run is."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` already consumed by each rank
    wandb_run_id: str = ""
    model_hash: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    best_val: float = float("inf")
    best_epoch: int = -1
    epochs_since_best: int = 0
    bad_steps: int = 0
    resumed_from: list[int] = field(default_factory=list)
    train_seconds: float = 0.0
    images_seen: int = 0
    epoch_loss_sum: float = 0.0  # sum over this epoch's finished steps of the rank-mean train loss
    epoch_loss_steps: int = 0


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def is_complete(folder: Path) -> bool:
    """A checkpoint counts only once its marker exists."""
    return (folder / MARKER).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete ``step-N`` checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None; half-written folders are ignored."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, root: Path, name: str, state: TrainState, keep_last: int) -> Path:
    """Every rank calls this at the same step; returns the final folder ``root/name``."""
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model.safetensors, optimizer, scheduler, scaler, each rank's RNG
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_write(tmp / STATE, json.dumps(asdict(state), indent=2))
        _fsync_write(tmp / MARKER, f"{state.step}\n")
        old = root / f".old-{name}"
        if final.exists():  # only "best" is ever replaced; step-N names are unique
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(folder: Path) -> TrainState:
    """Our state from a complete checkpoint folder."""
    if not is_complete(folder):
        raise UserError(f"checkpoint {folder} is incomplete (no {MARKER} marker); resume from another or set train.resume=never")
    return TrainState(**json.loads((folder / STATE).read_text()))


def read_matching_state(folder: Path, model_hash: str, fix: str = "use another run.name or train.resume=never") -> TrainState:
    """Our state from ``folder``, refusing a checkpoint written by a different model (``fix`` says what to do)."""
    state = read_state(folder)
    if state.model_hash != model_hash:
        raise UserError(
            f"checkpoint {folder} was written by a different model ({state.model.get('name')}, "
            f"model section hash {state.model_hash} != {model_hash}); {fix}"
        )
    return state


def load_checkpoint(accelerator: Accelerator, folder: Path, model_hash: str) -> TrainState:
    """Restore Accelerate's state from ``folder`` after checking it was written by the same model."""
    state = read_matching_state(folder, model_hash)
    try:
        accelerator.load_state(str(folder))
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {folder} does not fit this model ({first}); use another run.name or train.resume=never") from None
    return state


def find_resume(root: Path, resume: str) -> Path | None:
    """Which checkpoint ``train.resume`` points at: auto = newest complete, never = none, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_checkpoint(root)
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"train.resume={resume!r}: no such checkpoint folder; use auto, never or a checkpoints/step-N path")
    return path


class CheckpointPolicy:
    """When to save: every ``train.checkpoint_every`` steps (else at each epoch end), on preemption,
    the best val loss apart as ``best``, and once at the end, never twice for one step.
    ``before_save`` runs first on every rank (the engine folds its running sums into the state)."""

    def __init__(self, accelerator: Accelerator, root: Path, every: int, keep_last: int, before_save: Callable[[], None]) -> None:
        self.accelerator = accelerator
        self.root = root
        self.every = every
        self.keep_last = keep_last
        self.before_save = before_save
        self.saved_step = -1

    def save(self, state: TrainState, name: str | None = None) -> Path:
        """Save ``state`` as ``name`` (default ``step-N``) on every rank at the same step."""
        self.before_save()
        folder = save_checkpoint(self.accelerator, self.root, name or f"step-{state.step}", state, self.keep_last)
        if name is None:
            self.saved_step = state.step
        return folder

    def after_step(self, state: TrainState, preempted: bool) -> None:
        if preempted or (self.every and state.step % self.every == 0):
            self.save(state)

    def after_epoch(self, state: TrainState, last: bool) -> None:
        if not self.every and not last and self.saved_step != state.step:
            self.save(state)

    def after_eval(self, state: TrainState, val_loss: float | None) -> bool:
        """Track the best val loss (no val split: no model selection); True when it improved."""
        if val_loss is None:
            return False
        if val_loss < state.best_val:
            state.best_val, state.best_epoch, state.epochs_since_best = val_loss, state.epoch, 0
            self.save(state, "best")
            return True
        state.epochs_since_best += 1
        return False

    def finish(self, state: TrainState) -> None:
        if self.saved_step != state.step:
            self.save(state)
