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
import math
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

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


def check_writable(folder: Path, fix: str) -> None:
    """A one-line UserError ending in ``fix`` unless a file can be created in ``folder`` (made if missing): a
    read-only mount, an immutable folder or another user's folder would otherwise be a traceback at the first
    write, after minutes of work. A real create, since root passes access(2) on folders it cannot write."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"run folder {folder} is not writable ({err.strerror or err}); {fix}") from None


class DamagedCheckpoint(UserError):
    """A complete-looking checkpoint whose files cannot be read back. A UserError, so wherever no older
    checkpoint is tried (an explicit ``train.resume=PATH`` or ``--checkpoint NAME``) it is one line, exit 2."""

    def __init__(self, folder: Path, problem: str, fix: str = "use an earlier checkpoint") -> None:
        self.folder, self.problem = folder, problem
        super().__init__(f"checkpoint {folder} is damaged ({problem}); {fix}")


# state.json's fields: (types, lowest value). A checkpoint written before a field existed lacks it and gets
# the default; these three every checkpoint has always had, so one without them is damaged, not old.
_REQUIRED = ("step", "epoch", "model_hash")
_NUMBERS: dict[str, tuple[type | tuple[type, ...], float]] = {
    "step": (int, 0), "epoch": (int, 0), "batch": (int, 0), "best_epoch": (int, -1), "epochs_since_best": (int, 0),
    "bad_steps": (int, 0), "images_seen": (int, 0), "epoch_loss_steps": (int, 0),
    "train_seconds": ((int, float), 0), "epoch_loss_sum": ((int, float), -math.inf), "best_val": ((int, float), -math.inf),
}
_TEXTS = ("wandb_run_id", "model_hash", "started_from", "data_hash")
_INT_LISTS = {"resumed_from": 0, "world_sizes": 1}


def _check_state(data: Any) -> TrainState:
    """``data`` (state.json's content) as a TrainState, or ValueError naming the first bad field. Keys this
    version does not know are ignored, so a checkpoint written by a newer aedist still resumes."""
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    if missing := [k for k in _REQUIRED if k not in data]:
        raise ValueError(f"no {', '.join(missing)}")
    for key, (types, lowest) in _NUMBERS.items():
        v = data.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, types) or not v >= lowest or (key != "best_val" and not math.isfinite(v)):
            raise ValueError(f"{key} is {v!r}, expected {'an integer' if types is int else 'a number'} >= {lowest}")
    for key in _TEXTS:
        if not isinstance(data.get(key, ""), str):
            raise ValueError(f"{key} is {data[key]!r}, expected a string")
    for key, lowest in _INT_LISTS.items():
        v = data.get(key, [])
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < lowest for x in v):
            raise ValueError(f"{key} is {v!r}, expected a list of integers >= {lowest}")
    if not isinstance(data.get("model", {}), dict):
        raise ValueError(f"model is {data['model']!r}, expected an object")
    if data.get("data_position") is not None:
        from aedist.data.position import DataPosition

        try:
            DataPosition.from_dict(data["data_position"])
        except UserError as err:
            raise ValueError(str(err)) from None
    known = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in data.items() if k in known})


def read_state(folder: Path) -> TrainState:
    """Our state from a complete checkpoint folder; :class:`DamagedCheckpoint` when state.json is unreadable,
    not a JSON object, lacks step/epoch/model_hash, holds a field of the wrong type or range (data position
    included) or a step other than its ``step-N`` folder's. Unknown keys are ignored (a newer aedist's)."""
    if not (folder / STATE).exists() and not (folder / MARKER).exists():
        raise UserError(f"{folder} is not a checkpoint folder (no {STATE}); point train.resume at a runs/NAME/checkpoints/step-N folder")
    if not is_complete(folder):
        raise UserError(f"checkpoint {folder} is incomplete (no {MARKER} marker); resume from another or set train.resume=never")
    try:
        state = _check_state(json.loads((folder / STATE).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpoint(folder, f"{STATE} unreadable ({type(err).__name__})") from None
    except ValueError as err:
        raise DamagedCheckpoint(folder, f"{STATE}: {err}") from None
    if folder.name.startswith("step-") and folder.name[5:].isdigit() and int(folder.name[5:]) != state.step:
        raise DamagedCheckpoint(folder, f"{STATE} says step {state.step}")
    return state


def read_matching_state(folder: Path, model_hash: str, fix: str = "use another run.name or train.resume=never") -> TrainState:
    """Our state from ``folder``, refusing a checkpoint written by a different model (``fix`` says what to do)."""
    state = read_state(folder)
    if state.model_hash != model_hash:
        raise UserError(
            f"checkpoint {folder} was written by a different model ({state.model.get('name')}, "
            f"model section hash {state.model_hash} != {model_hash}); {fix}"
        )
    return state


def check_files(folder: Path, patterns: tuple[str, ...]) -> None:
    """:class:`DamagedCheckpoint` unless every file of ``folder`` matching ``patterns`` is whole. torch.save
    writes zip archives: a truncated one has no central directory and a changed byte fails its CRC. Checked
    before loading because Accelerate swallows a failed RNG load (the run would go on, no longer exact),
    and a torch.load that fails is only the class name, never torch's advice to drop weights_only."""
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            if path.suffix == ".safetensors":
                _check_safetensors(folder, path)
                continue
            try:
                with open(path, "rb") as fh:
                    head = fh.read(4)
                if head != b"PK\x03\x04":  # a legacy (non-zip) torch.save pickle has nothing to check it by
                    bad = None if head[:1] == b"\x80" else "?"
                else:
                    with zipfile.ZipFile(path) as zf:
                        bad = zf.testzip()
            except (OSError, zipfile.BadZipFile, EOFError, ValueError):
                bad = "?"
            if bad is not None:
                raise DamagedCheckpoint(folder, f"{path.name} cannot be read: truncated or corrupt")


def _check_safetensors(folder: Path, path: Path) -> None:
    """A safetensors file's header names each tensor's byte range: the file must hold exactly that many bytes."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n < 100_000_000 else None
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0) if isinstance(header, dict) else -1
        whole = end >= 0 and path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        whole = False
    if not whole:
        raise DamagedCheckpoint(folder, f"{path.name} cannot be read: truncated or corrupt")


TRAIN_FILES = ("*.safetensors", "*.bin", "*.pkl", "*.pt")  # what Accelerate's load_state reads


def verify_checkpoint(folder: Path, model_hash: str) -> TrainState:
    """Our state from ``folder`` once every file a resume reads is there and intact (written by the same
    model, weights and optimizer present, every torch.save zip's CRCs and safetensors' lengths right)."""
    state = read_matching_state(folder, model_hash)
    missing = [f for f in ("model.safetensors", "optimizer.bin") if not (folder / f).is_file()]
    if missing:
        raise DamagedCheckpoint(folder, f"{', '.join(missing)} missing")
    check_files(folder, TRAIN_FILES)
    return state


def load_checkpoint(accelerator: Accelerator, folder: Path, model_hash: str) -> TrainState:
    """Restore Accelerate's state from ``folder`` after :func:`verify_checkpoint`;
    :class:`DamagedCheckpoint` when its files cannot be read back."""
    state = verify_checkpoint(folder, model_hash)
    try:
        accelerator.load_state(str(folder))
    except Exception as err:  # noqa: BLE001 - safetensors, pickle and torch each raise their own types
        # The class name only: torch's own message suggests weights_only=False, which must never be the fix.
        raise DamagedCheckpoint(folder, f"unreadable ({type(err).__name__})") from None
    return state


T = TypeVar("T")


def newest_usable(root: Path, load: Callable[[Path], T], warn: Callable[[str], None], fix: str) -> tuple[T, Path] | None:
    """``load`` applied to the newest complete ``step-N`` checkpoint under ``root`` where it succeeds, falling
    back past each one it finds damaged (:class:`DamagedCheckpoint`) with one ``warn`` line; None when there
    is no checkpoint; a one-line UserError ending in ``fix`` when every one is damaged. The one fallback
    path of training (``load`` restores Accelerate's state) and evaluate.py (``load`` reads the weights)."""
    found = list_checkpoints(root)
    problems = []
    for folder in reversed(found):
        try:
            return load(folder), folder
        except DamagedCheckpoint as err:
            warn(f"warning: checkpoint {folder} is damaged ({err.problem}); trying the one before it")
            problems.append(f"{folder.name}: {err.problem}")
    if found:
        raise UserError(f"no usable checkpoint in {root} (all {len(found)} damaged; {'; '.join(problems[:3])}); {fix}")
    return None


def load_newest_usable(accelerator: Accelerator, root: Path, model_hash: str) -> tuple[TrainState, Path] | None:
    """The newest complete checkpoint that loads, falling back past damaged ones with a one-line
    warning each; None when there is none; a one-line UserError when every one is damaged."""
    return newest_usable(root, lambda folder: load_checkpoint(accelerator, folder, model_hash), accelerator.print,
                         "set train.resume=never to start over")


def named_checkpoint(root: Path, name: str, flag: str = "--checkpoint") -> Path:
    """The complete checkpoint ``root/name`` a user named; a one-line UserError for a name that is not a
    plain folder name (``../x``, ``/abs``, empty), no such folder, a file, or a half-written folder."""
    have = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir() and is_complete(p))) if root.is_dir() else ""
    choose = f"pass one of: {have}" if have else "train the run first"
    if not name or name in (".", "..") or name != Path(name).name or "\\" in name or name.startswith("."):
        raise UserError(f"{flag} {name!r} must be the plain name of a folder in {root} (e.g. step-N or best); {choose}")
    folder = root / name
    if not folder.is_dir():
        raise UserError(f"{flag} {name!r}: no checkpoint folder {folder}; {choose}")
    if not is_complete(folder):
        raise UserError(f"{flag} {name!r}: checkpoint {folder} is incomplete (no {MARKER} marker, half-written); {choose}")
    return folder


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

    def due(self, step: int) -> bool:
        """Whether :meth:`after_step` saves at ``step`` without a preemption."""
        return bool(self.every and step % self.every == 0)

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
