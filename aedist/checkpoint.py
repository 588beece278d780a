"""Atomic checkpoints: Accelerate's state plus ours, in ``runs/NAME/checkpoints/step-N/``.

A checkpoint is written into ``.tmp-step-N/``, our ``state.json`` and then the ``COMPLETE`` marker
are written and flushed, and only then is the folder renamed into place. A crash at any point
leaves either the previous checkpoints untouched or a ``.tmp-*`` folder that nothing reads, so the
newest complete checkpoint is never corrupted. Checkpoint folders must sit on a filesystem every
rank can see (as on any multi-node cluster), since each rank writes its own RNG state there.
"""

from __future__ import annotations

import errno
import json
import os
import re
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
    batch: int = 0  # micro-batches this start's stream of ``epoch`` yielded per rank (older checkpoints: of the epoch)
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
    started_from: str = ""  # the checkpoint of another run this run started from, if any
    world_sizes: list[int] = field(default_factory=list)  # processes of each start, in order
    # Where ``epoch`` stands in world-independent terms (DataPosition.to_dict()); None at an epoch's start.
    # Checkpoints written before it existed have only ``batch``, read as this world's position.
    data_position: dict[str, Any] | None = None
    # The shards' content hash this run trains on (aedist.resume.data_hash): a resume refuses shards
    # re-packed in place with other data. Empty in checkpoints written before it existed: not checked.
    data_hash: str = ""


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


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); older ones are untouched."""


_FULL_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}
# How libraries word ENOSPC/EDQUOT once they have wrapped it: safetensors (Rust) "No space left on device
# (os error 28)", C++ streams and others "errno 28", Python's own "[Errno 122] Disk quota exceeded".
_FULL_TEXT = re.compile(rf"(no space left on device)|(quota exceeded)|(?:os error|errno)\]? ?({errno.ENOSPC}|{errno.EDQUOT})\b", re.IGNORECASE)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and every exception it was raised from or while handling, each once."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is not None and not any(e is s for s in seen):
            seen.append(e)
            todo += [e.__cause__, e.__context__]
    return seen


def _no_room(folder: Path) -> str:
    """Ask the filesystem holding ``folder`` whether it has room left: write and fsync 64 KiB there (a
    delayed-allocation filesystem only reports ENOSPC/EDQUOT at fsync). The cause's name, or "" if it fits."""
    probe = folder / f".space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(bytes(65536))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        return _FULL_ERRNOS.get(err.errno or 0, "")
    finally:
        probe.unlink(missing_ok=True)
    return ""


def disk_full(err: BaseException, folder: Path | None = None) -> str:
    """Why ``err`` means the disk (or the user's quota) is full, or "" when it does not, however a library
    wrapped the ENOSPC/EDQUOT: an OSError's errno anywhere in the ``__cause__``/``__context__`` chain,
    the message text of a RuntimeError or SafetensorError, and, for torch.save, whose C++ writer loses
    errno altogether ("unexpected pos N vs M", "iostream error"), a probe write into ``folder``."""
    chain = _chain(err)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return _FULL_ERRNOS[e.errno]
    for e in chain:
        if m := _FULL_TEXT.search(str(e)):
            return _FULL_ERRNOS[errno.ENOSPC if m.group(1) else errno.EDQUOT if m.group(2) else int(m.group(3))]
    return _no_room(folder) if folder is not None and folder.is_dir() else ""


def _phase(accelerator: Accelerator, fn: Callable[[], None], folder: Path) -> None:
    """Run one phase of a save on every rank and agree on its outcome (a barrier that carries a
    failure flag): a rank whose write failed must not leave the others waiting forever. Any OSError,
    and a full disk however a library reports it, is a CheckpointError; another exception is re-raised
    on its rank after the others were told (they raise CheckpointError)."""
    failure, other = "", None
    try:
        fn()
    except OSError as err:
        failure = f"{disk_full(err) or err.strerror or err} ({err.filename or folder})"
    except Exception as err:  # noqa: BLE001 - torch (RuntimeError), safetensors (SafetensorError) wrap ENOSPC in their own types
        if cause := disk_full(err, folder):
            failure = f"{cause} ({folder}; {type(err).__name__})"
        else:
            other = err
    if accelerator.num_processes > 1:
        import torch

        flag = torch.tensor([1.0 if failure or other else 0.0], device=accelerator.device)
        if float(accelerator.reduce(flag, "sum")) and not (failure or other):
            failure = "another rank could not write its part"
    if other is not None:
        raise other
    if failure:
        raise CheckpointError(failure)


def save_checkpoint(accelerator: Accelerator, root: Path, name: str, state: TrainState, keep_last: int) -> Path:
    """Every rank calls this at the same step; returns the final folder ``root/name``. On a write
    error (disk full) the temporary folder is removed and :class:`CheckpointError` raised on every rank."""
    final, tmp = root / name, root / f".tmp-{name}"
    main = accelerator.is_main_process

    def start() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write() -> None:
        accelerator.save_state(str(tmp))  # model.safetensors, optimizer, scheduler, scaler, each rank's RNG

    def commit() -> None:
        if main:
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

    try:
        for phase in (start, write, commit):
            _phase(accelerator, phase, tmp)
    except CheckpointError as err:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {err}; the older checkpoints in {root} are kept") from None
    except Exception:  # a bug, not the disk: its traceback is wanted, a half-written folder is not
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class DamagedCheckpoint(Exception):
    """A complete-looking checkpoint whose files cannot be read back."""


def read_state(folder: Path) -> TrainState:
    """Our state from a complete checkpoint folder."""
    if not (folder / STATE).exists() and not (folder / MARKER).exists():
        raise UserError(f"{folder} is not a checkpoint folder (no {STATE}); point train.resume at a runs/NAME/checkpoints/step-N folder")
    if not is_complete(folder):
        raise UserError(f"checkpoint {folder} is incomplete (no {MARKER} marker); resume from another or set train.resume=never")
    try:
        return TrainState(**json.loads((folder / STATE).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise DamagedCheckpoint(f"{STATE} unreadable ({type(err).__name__})") from None


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
    """Restore Accelerate's state from ``folder`` after checking it was written by the same model;
    :class:`DamagedCheckpoint` when its files cannot be read back."""
    state = read_matching_state(folder, model_hash)
    missing = [f for f in ("model.safetensors", "optimizer.bin") if not (folder / f).is_file()]
    if missing:
        raise DamagedCheckpoint(f"{', '.join(missing)} missing")
    try:
        accelerator.load_state(str(folder))
    except Exception as err:  # noqa: BLE001 - safetensors, pickle and torch each raise their own types
        # The class name only: torch's own message suggests weights_only=False, which must never be the fix.
        raise DamagedCheckpoint(f"unreadable ({type(err).__name__})") from None
    return state


def load_newest_usable(accelerator: Accelerator, root: Path, model_hash: str) -> tuple[TrainState, Path] | None:
    """The newest complete checkpoint that loads, falling back past damaged ones with a one-line
    warning each; None when there is none; a one-line UserError when every one is damaged."""
    found = list_checkpoints(root)
    for folder in reversed(found):
        try:
            return load_checkpoint(accelerator, folder, model_hash), folder
        except DamagedCheckpoint as err:
            accelerator.print(f"warning: checkpoint {folder} is damaged ({err}); trying the one before it")
    if found:
        raise UserError(f"no usable checkpoint in {root} (all {len(found)} damaged); set train.resume=never to start over")
    return None


def find_resume(resume: str) -> Path | None:
    """The checkpoint folder ``train.resume`` names (None for auto and never)."""
    if resume in ("never", "auto"):
        return None
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
