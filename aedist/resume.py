"""Resuming a run: who owns the run folder, and what a config changed since the last start means.

What may change on resume (``config.yaml`` always holds what is used; ``resumes.jsonl`` the history):

- takes effect at once, with a one-line notice: the optimizer's ``lr``, ``weight_decay`` and
  ``momentum`` (written into the restored optimizer; the new lr is also the cosine schedule's base),
  ``grad_clip``, the plateau factor/patience, epochs and max_steps, checkpoint/eval/log cadence,
  precision and speed settings, evaluation settings, W&B names;
- continues at the same sample position: ``data.batch_size`` and ``train.grad_accum`` (and the number
  of processes), see :mod:`aedist.data.position`;
- refused in one line (exit 2), because the run would silently become another experiment: the
  model, the shards, the data limit/normalization/shuffle buffer, the corruptions, the loss, the
  optimizer and scheduler type, the RNG seed; and shards re-packed in place with other content
  (same folder, other :func:`data_hash` than the checkpoint records).

Starting a new run from another run's checkpoint (``train.resume=PATH`` outside this run) is
fine-tuning: it may use other shards, and records theirs from then on.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aedist.config import read_yaml
from aedist.errors import UserError

if TYPE_CHECKING:
    from aedist.data.shards import Manifest

FIXED = ("model.", "data.shards", "data.limit", "data.normalize", "data.shuffle_buffer", "corruption", "loss.",
         "optim.name", "optim.scheduler", "optim.warmup_steps", "train.seed", "objective.", "train.ema_decay")
LIVE_OPTIM = ("lr", "weight_decay", "momentum")  # written into the restored optimizer's param groups


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``; lists and the corruption mappings stay whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("corruptions", "params"):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs between two resolved configs: ``{key: (old, new)}``."""
    a, b = flatten(old), flatten(new)
    # Keys only one side knows come from another aedist version, not from the user.
    return {k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k] and not k.startswith("run.")}


def check_changes(changes: dict[str, tuple[Any, Any]], run_dir: Path) -> None:
    """Refuse, in one line, a change that would turn the resumed run into another experiment."""
    fixed = {k: v for k, v in changes.items() if k.startswith(FIXED)}
    if fixed:
        key, (was, now) = next(iter(fixed.items()))
        more = f" (and {len(fixed) - 1} more)" if len(fixed) > 1 else ""
        raise UserError(f"{key} changed from {was!r} to {now!r}{more}, which cannot change in a running experiment; "
                        f"put it back, or start a new run (another run.name, or train.resume=never) for {run_dir}")


def apply_changes(changes: dict[str, tuple[Any, Any]], optimizer: Any, schedule: Any) -> None:
    """Make the restored optimizer and schedule follow the new values (a restore brings back the old ones)."""
    for name in LIVE_OPTIM:
        if f"optim.{name}" in changes:
            value = changes[f"optim.{name}"][1]
            for group in optimizer.param_groups:
                if name in group:
                    group[name] = value
                    if name == "lr":
                        group["initial_lr"] = value
            if name == "lr" and hasattr(schedule.inner, "base_lrs"):
                schedule.inner.base_lrs = [value] * len(optimizer.param_groups)
    inner = schedule.inner
    if "optim.plateau_factor" in changes and hasattr(inner, "factor"):
        inner.factor = changes["optim.plateau_factor"][1]
    if "optim.plateau_patience" in changes and hasattr(inner, "patience"):
        inner.patience = changes["optim.plateau_patience"][1]


def previous_config(run_dir: Path) -> dict[str, Any] | None:
    """The config.yaml the run last used (None for a new run); a garbled one is a one-line error."""
    path = run_dir / "config.yaml"
    return read_yaml(path, "the run's last config") if path.is_file() else None


def data_hash(manifest: Manifest) -> str:
    """What the shards hold, whatever folder or URL they come from: the content hash the packer
    recorded (images, labels, class names), else (a streamed folder pack, foreign shards) a hash of
    every shard's sha256 (or, without one, its name and size) and the class names."""
    recorded = manifest.source.get("content_sha256")
    if recorded:
        return str(recorded)
    parts = [manifest.classes, [[name, [[s.name, s.sha256 or s.bytes] for s in split.shards]] for name, split in sorted(manifest.splits.items())]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def check_same_data(started: str, now: str, shards: str, run_dir: Path) -> None:
    """Refuse, in one line, to resume a run on shards whose content changed since it started (a folder
    re-packed in place with other classes keeps its path and sample count: nothing else would notice).
    ``started`` is empty for checkpoints written before the hash was recorded: those are not checked."""
    if started and started != now:
        parts = urlsplit(shards)
        if parts.username or parts.password:  # never print a URL's credentials
            shards = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
        raise UserError(f"data.shards={shards} holds other data than run {run_dir} started on (content hash {started[:16]} "
                        f"at the start, {now[:16]} now: re-packed in place?); point data.shards back at the original pack, "
                        "or start a new run (another run.name, or train.resume=never)")


def record_resume(run_dir: Path, entry: dict[str, Any]) -> None:
    """Append one line per (re)start to ``resumes.jsonl``: step, world size, what changed."""
    with open(run_dir / "resumes.jsonl", "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}, default=str) + "\n")


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` held by the main process for the whole run. The
    kernel drops it when the holder dies, however it dies, so a requeued job is never locked out by
    its own killed predecessor; a second live run with the same folder is refused in one line."""

    def __init__(self, run_dir: Path) -> None:
        from aedist.checkpoint import check_writable

        check_writable(run_dir, "make it writable, or set run.dir to a writable folder (a run writes its checkpoints there)")
        self.path = run_dir / ".lock"
        self.fh = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            owner = self.fh.read().strip() or "another process"
            self.fh.close()
            raise UserError(f"run folder {run_dir} is in use by {owner}; wait for it, or pick another run.name") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.fh.flush()

    def release(self) -> None:
        if not self.fh.closed:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
