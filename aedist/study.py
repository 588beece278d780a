"""A study file as data: the claims of published experiments, their schedules, data and own numbers.

    study = load_study("configs/seeds/claims.yaml")

Its format is described at the top of configs/seeds/claims.yaml. :func:`check_claim` gives each claim
a verdict from the runs present; :func:`decide` holds the rule: a gap counts only where it exceeds the
run-to-run spread (or, with no repeats, a clear margin), and only where the runs match the source's
schedule (and data, where the claim depends on it).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from aedist.config import read_yaml
from aedist.errors import UserError

if TYPE_CHECKING:  # the report imports this module; its Run is only a type here
    from aedist.report import Run

OPS: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
HOLDS, FAILS, UNTESTED = "holds", "does not hold", "not tested here"


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): what a metric value must be to count."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in the study file is an error, not a silently ignored key


class Side(_Strict):
    """One side of a claim: ``metric`` of the runs of group ``run``, or a fixed ``value``."""
    run: str | None = None
    metric: str | None = None
    value: float | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Side:
        if (self.value is None) == (self.run is None or self.metric is None):
            raise ValueError("give either run and metric, or value")
        if self.metric and self.metric.rpartition(":")[0] not in ("", "best", "first", "last"):
            raise ValueError(f"metric {self.metric!r}: the prefix must be best:, first: or last:")
        return self


class Claim(_Strict):
    text: str
    lhs: Side
    op: Literal["<", "<=", ">", ">="]
    rhs: Side
    factor: float = 1.0  # the claim reads: lhs OP factor x rhs
    data_dependent: bool = False  # a stand-in dataset cannot test it


class Reference(_Strict):
    run: str
    metric: str
    label: str
    source: float
    note: str = ""


class Experiment(_Strict):
    title: str
    source: str = ""
    epochs: int
    data: str
    shards: list[str] = []  # our shards folders that hold the source's own data
    standins: dict[str, str] = {}  # other shards folder -> what it holds
    runs: dict[str, list[str]] = {}  # run -> figure keys to show
    claims: list[Claim] = []
    references: list[Reference] = []


class Study(_Strict):
    title: str = "Results"
    intro: str = ""
    spread_factor: float = 2.0
    clear_margin: float = 0.5
    experiments: dict[str, Experiment] = {}


def load_study(path: str | Path) -> Study:
    """The study file as a :class:`Study`, or a one-line UserError naming the bad entry."""
    try:
        return Study.model_validate(read_yaml(path, "study file"))
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise UserError(f"study file {path}: {where}: {e['msg']}; the format is described atop configs/seeds/claims.yaml") from None


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # sample std (ddof=1) over repeats; None for a single run: no spread measured
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        a = np.asarray(values, dtype=float)
        return cls(float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None, len(a))

    def fmt(self, spec: str = ".4f") -> str:
        """``mean ± std (n)``; a significant-figures spec (``.4g``) sets the mean's decimals and the std
        shares them, so 0.005279 ± 0.000059 reads as one scale rather than 0.005279 ± 5.867e-05."""
        if spec.endswith("g") and self.std is not None and math.isfinite(self.mean):
            digits = int(spec[1:-1] or 6)
            scale = math.floor(math.log10(abs(self.mean))) if self.mean else 0
            spec = f".{max(0, digits - 1 - scale)}f"
        return format(self.mean, spec) + ("" if self.std is None else f" ± {format(self.std, spec)} ({self.n})")


def group_stat(members: Sequence[Run], metric: str) -> Stat | None:
    vals = [v for r in members if (v := r.value(metric)) is not None]
    return Stat.of(vals) if vals else None


def decide(op: str, factor: float, lhs: Stat, rhs: Stat, spread_factor: float, clear_margin: float) -> tuple[str, str]:
    """The verdict on ``lhs OP factor x rhs`` and the rule that gave it. Decisive only where the gap
    exceeds ``spread_factor`` x the larger std over repeats or, with no repeats on either side, where
    it exceeds ``clear_margin`` of the larger side (a close comparison needs measured spread)."""
    target = factor * rhs.mean
    gap = lhs.mean - target
    status = HOLDS if OPS[op](lhs.mean, target) else FAILS
    stds = [s for s in (lhs.std, None if rhs.std is None else abs(factor) * rhs.std) if s is not None]
    if stds:
        spread = max(stds)
        if abs(gap) > spread_factor * spread:
            return status, f"gap {abs(gap):.3g} > {spread_factor:g} x the larger std {spread:.2g}"
        return UNTESTED, f"gap {abs(gap):.3g} is within {spread_factor:g} x the run-to-run std {spread:.2g}"
    rel = abs(gap) / max(abs(lhs.mean), abs(target), 1e-12)
    if rel > clear_margin:
        return status, f"no repeats; gap {rel:.0%} of the larger side > {clear_margin:.0%}"
    return UNTESTED, f"no repeats for a close comparison (gap {rel:.0%} of the larger side, {clear_margin:.0%} needed)"


def data_of(exp: Experiment, run: Run) -> tuple[bool, str]:
    """(on the source's own data?, what the run trained on)."""
    if run.shards in exp.shards:
        return True, f"{run.shards} ({exp.data})"
    return False, f"{run.shards} (stand-in: {exp.standins.get(run.shards, 'other data')} instead of {exp.data})"


def check_claim(claim: Claim, exp: Experiment, groups: dict[str, list[Run]], study: Study,
                under_way: dict[str, str] | None = None) -> tuple[str, str, str]:
    """(status, evidence, reason) for one claim of ``exp`` over the run groups present; ``under_way``
    maps a run with no finished member to how far it got, said instead of "missing"."""
    stats: list[Stat | None] = []
    reasons: list[str] = []
    for side in (claim.lhs, claim.rhs):
        if side.value is not None:
            stats.append(Stat(side.value, None, 1))
            continue
        members = groups.get(str(side.run), [])
        st = group_stat(members, str(side.metric)) if members else None
        if not members:
            progress = (under_way or {}).get(str(side.run))
            reasons.append(f"run {side.run} unfinished ({progress})" if progress else f"run {side.run} missing")
        elif st is None:
            reasons.append(f"{side.metric} missing from {side.run}")
        stats.append(st)
    lhs, rhs = stats
    evidence = f"{_describe(claim.lhs, lhs)} vs {'' if claim.factor == 1 else f'{claim.factor:g} x '}{_describe(claim.rhs, rhs)}"
    for run in dict.fromkeys(s.run for s in (claim.lhs, claim.rhs) if s.run in groups):
        members = groups[str(run)]
        epochs = sorted({int(e) if is_number(e := m.summary.get("epoch")) else -1 for m in members})
        if epochs != [exp.epochs]:
            reasons.append(f"{run} trained {'/'.join(map(str, epochs))} of the source's {exp.epochs} epochs")
        own, what = data_of(exp, members[0])
        if claim.data_dependent and not own:
            reasons.append(f"{run} ran on {what}, and the claim depends on the data")
    if reasons or lhs is None or rhs is None:
        return UNTESTED, evidence, "; ".join(reasons)
    status, rule = decide(claim.op, claim.factor, lhs, rhs, study.spread_factor, study.clear_margin)
    return status, evidence, rule


def _describe(side: Side, st: Stat | None) -> str:
    if side.value is not None:
        return f"{side.value:g}"
    return f"{side.metric} of {side.run} = {st.fmt('.4g') if st else '–'}"
