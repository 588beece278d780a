"""A run folder as the report and the study read it: config, summary, eval files and per-epoch rows.

    run = load_run("runs/NAME")
    run.value("best:test/mse"), run.value("last:train/epoch_loss"), run.value("tail5:train/epoch_loss")
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aedist.config import read_yaml
from aedist.errors import UserError

log = logging.getLogger(__name__)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): what a metric value must be to count."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


REPEAT = re.compile(r"^(?P<base>.+)-s\d+$")  # NAME-s1, NAME-s2: NAME trained again with train.seed=1, 2
COLLAPSED = 0.05  # test/variety below this: the outputs vary under 5 % as much as the targets do
EPOCH_LOSS = "train/epoch_loss"
CURVE_KEYS = (EPOCH_LOSS, "val/loss", "test/loss")


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; {fix}")
    return data


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows. A crash mid-write leaves a half line (a resume then appends to it), so an
    unreadable line is skipped with a warning rather than failing the whole report."""
    rows = []
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            log.warning("%s line %d is not a JSON object (half-written by a crash?); skipped", path, i)
        elif row:
            rows.append(row)
    return rows


def _points(rows: Iterable[dict[str, Any]], key: str, shift: int) -> list[tuple[int, float]]:
    pts: dict[int, float] = {}
    for row in rows:
        if is_number(row.get(key)) and is_number(row.get("epoch")):
            pts[int(row["epoch"]) + shift] = float(row[key])  # a resumed run logs an epoch again: the last row wins
    return sorted(pts.items())


def epoch_series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[tuple[int, float]], str | None]:
    """(1-based epoch, value) of ``key``; for the epoch-mean training loss of an older run that did not
    log it, the last step value of each epoch, with a note saying so."""
    pts = _points(rows, key, 0)
    if pts or key != EPOCH_LOSS:
        return pts, None
    # Step rows carry the 0-based epoch in progress; +1 puts them at the epoch val/test rows are logged at.
    pts = _points(rows, "train/loss", 1)
    return pts, ("train: last logged step of each epoch, not the epoch mean (run predates train/epoch_loss)" if pts else None)


@dataclass
class Run:
    """One run folder as the report needs it."""
    name: str
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    evals: dict[str, dict[str, Any]]  # "last": the newest checkpoint's eval files merged (eval.json, eval_train.json ...), "best": eval_best*.json
    rows: list[dict[str, Any]]
    command: str

    def section(self, name: str) -> dict[str, Any]:
        v = self.config.get(name)
        return v if isinstance(v, dict) else {}

    @property
    def shards(self) -> str:
        return Path(str(self.section("data").get("shards", "?"))).name

    @property
    def precision(self) -> str:  # the resolved value when the run recorded one ("auto" says little)
        return str(self.summary.get("mixed_precision") or self.section("train").get("mixed_precision", "?"))

    def value(self, metric: str) -> float | None:
        """``KEY`` from the newest checkpoint's eval files over summary.json; ``best:KEY`` from the
        best-validation checkpoint's; ``first:KEY`` / ``last:KEY`` from the per-epoch rows of
        metrics.jsonl; ``tail5:KEY``: the share of KEY's whole decrease (epoch 1 to the last) made in
        the last 5 epochs, which is about 5/epochs for a straight line and near 0 once it has flattened."""
        kind, _, key = metric.rpartition(":")
        if kind in ("first", "last", "tail5"):
            pts = [v for _, v in epoch_series(self.rows, key)[0]]
            if kind == "tail5":
                total = pts[0] - pts[-1] if len(pts) > 5 else 0.0
                return (pts[-6] - pts[-1]) / total if total else None
            return pts[0 if kind == "first" else -1] if pts else None
        v = (self.evals["best"] if kind == "best" else {**self.summary, **self.evals["last"]}).get(key)
        return float(v) if is_number(v) else None

    def collapsed(self) -> str:
        """"" unless a scored checkpoint's outputs barely vary from image to image (``test/variety`` under
        COLLAPSED, launch/evaluate.py --metrics variety): then which ones, e.g. "last 0.000, best 0.000".
        Such a model gives about one image (the mean) for every input, a failed training that MSE alone
        shows only as a high error."""
        vals = [(kind, self.value(f"{pre}test/variety")) for kind, pre in (("last", ""), ("best", "best:"))]
        return ", ".join(f"{kind} {v:.3f}" for kind, v in vals if v is not None and v < COLLAPSED)


def eval_file(checkpoint: str | None, split: str = "test") -> str:
    """The file launch/evaluate.py writes a checkpoint's metrics of ``split`` to: eval.json (newest,
    test), eval_best.json, eval_train.json, eval_best_train.json ... (keys carry the split, so the
    report merges one checkpoint's files)."""
    return "eval" + (f"_{checkpoint}" if checkpoint else "") + ("" if split == "test" else f"_{split}") + ".json"


def load_run(path: str | Path) -> Run:
    """Read a run folder; a garbled file is a one-line UserError naming it and the fix."""
    p = Path(path)
    cfg = read_yaml(p / "config.yaml", "run config")
    summary = _read_json(p / "summary.json", "restore it, or delete it and train the run again (it resumes)")
    # the checkpoint an eval file must have scored: the run's last step, or the epoch of its best validation loss
    ends = {"last": ("checkpoint_step", summary.get("step")), "best": ("epoch", summary.get("best_epoch"))}
    evals: dict[str, dict[str, Any]] = {}
    for kind, ckpt in (("last", None), ("best", "best")):
        evals[kind] = {}
        for split in ("test", "val", "train"):
            flag = "" if ckpt is None else f" --checkpoint {ckpt}"
            fix = f"python launch/evaluate.py {p}{flag} --split {split}"
            values = _read_json(p / eval_file(ckpt, split), f"evaluate again: {fix}")
            key, end = ends[kind]
            if is_number(values.get(key)) and is_number(end) and values[key] != end:  # the run trained on after it was scored
                log.warning("%s scored %s %s, but the run's %s checkpoint is at %s; left out until: %s",
                            p / eval_file(ckpt, split), key, values[key], kind, end, fix)
                continue
            evals[kind].update(values)
    cmd = p / "command.txt"  # one line per (re)start: a resumed run lists each command once
    command = "\n".join(dict.fromkeys(cmd.read_text(errors="replace").splitlines())) if cmd.is_file() else ""
    return Run(p.name, p, cfg, summary, evals, read_rows(p / "metrics.jsonl"), command)


RECORD_FILES = ("config.yaml", "summary.json", "command.txt", "metrics.jsonl", "eval*.json")


def save_record(run: Run, root: Path, figures: Iterable[Path] = ()) -> Path:
    """Write ``run``'s record to ``root/NAME``: the files the report reads (config, summary, command,
    per-epoch metrics, eval files) and the given figures, no checkpoints or W&B folder. A record is a
    run folder the report can be rebuilt from once runs/ (checkpoints, not committed) is gone.
    The new record is built beside the old one and swapped in, so a crash leaves one of the two whole."""
    dest = root / run.name
    if dest.resolve() == run.path.resolve():
        return dest  # reported from the record itself: nothing newer to copy
    tmp, old = root / f".{run.name}.new", root / f".{run.name}.old"
    restore_records(root)  # a swap a crash cut short left the old record aside: put it back before anything is removed
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    (tmp / "figures").mkdir(parents=True)
    for pattern in RECORD_FILES:
        for f in run.path.glob(pattern):
            shutil.copy2(f, tmp / f.name)
    for f in figures:
        shutil.copy2(f, tmp / "figures" / f.name)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def restore_records(root: Path) -> list[Path]:
    """Put back each record that a crash between save_record's two renames left only as ``.NAME.old``
    (the report and reproduce.sh, which read ``root/*/``, would see it missing), and remove half-built
    ``.NAME.new`` folders (whether one was complete cannot be told); returns the records put back."""
    root, restored = Path(root), []
    for old in sorted(root.glob(".*.old")) if root.is_dir() else []:
        dest = old.with_name(old.name[1:].removesuffix(".old"))
        if old.is_dir() and not dest.exists():
            old.rename(dest)
            restored.append(dest)
    for new in root.glob(".*.new") if root.is_dir() else []:
        shutil.rmtree(new, ignore_errors=True)
    return restored


def latest_runs(runs: Iterable[Run]) -> list[Run]:
    """One run per name: a finished one over an unfinished one, else the one given last. The report
    takes records (docs/runs/NAME) and live folders (runs/NAME) together; the live one, listed after,
    replaces its record once it has finished again, and a run resumed for more epochs does not hide
    its finished record meanwhile."""
    by_name: dict[str, Run] = {}
    for r in runs:
        prev = by_name.get(r.name)
        if prev is None or bool(r.summary) >= bool(prev.summary):
            by_name[r.name] = r
    return list(by_name.values())


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """NAME, NAME-s1, NAME-s2 … -> {NAME: [runs]}, NAME itself first."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        m = REPEAT.match(r.name)
        groups.setdefault(m["base"] if m else r.name, []).append(r)
    return {base: sorted(rs, key=lambda r: (r.name != base, r.name)) for base, rs in groups.items()}


