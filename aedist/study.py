"""A study file as data: the claims of published experiments, their schedules, data and own numbers.

    study = load_study("configs/seeds/claims.yaml")

Its format is described at the top of configs/seeds/claims.yaml. :func:`check_claim` gives each claim
a verdict from the runs present; :func:`decide` holds the rules, stated once so the report can print
them:

- a comparison (``< <= > >=``) is decisive where its gap exceeds ``spread_factor`` x the larger std
  over repeated training seeds; with no repeats, where it exceeds the claim's stated margin
  (``margin``: relative, for ratio-scale quantities such as MSE; ``margin_abs``: in the metric's units,
  the only kind a log quantity such as dB may use) or, for ratio-scale quantities, the study's
  ``clear_margin``; against a fixed threshold it is decisive as it stands;
- an equivalence (``~=``, within ``margin`` / ``margin_abs``) holds where the gap plus the spread band
  stays inside the margin, fails where the gap minus the band is outside it, and is open otherwise;
- a run that trained another schedule than the source's leaves its claims *not tested here*; a run
  on a stand-in dataset gets a verdict that says so ("holds on ..."), never a silent "not tested".
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from aedist.config import read_yaml
from aedist.errors import UserError
from aedist.runs import Run, is_number

OPS: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
HOLDS, FAILS, UNTESTED, SHOWN = "holds", "does not hold", "not tested here", "numbers only"


def is_log_scale(metric: str) -> bool:
    """Decibels (and other logs) have no meaningful zero, so a margin relative to their size is arbitrary."""
    return metric.endswith("_db")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in the study file is an error, not a silently ignored key


class Side(_Strict):
    """One side of a claim: ``metric`` of the runs of group ``run`` (a list: their mean, e.g. over
    classes; ``minus``: less another metric of the same run, e.g. a val - train gap), or a fixed ``value``."""
    run: str | None = None
    metric: str | list[str] | None = None
    minus: str | None = None
    value: float | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Side:
        if (self.value is None) == (self.run is None or self.metric is None):
            raise ValueError("give either run and metric, or value")
        for m in [*self.metrics, *([self.minus] if self.minus else [])]:
            if m.rpartition(":")[0] not in ("", "best", "first", "last", "tail5"):
                raise ValueError(f"metric {m!r}: the prefix must be best:, first:, last: or tail5:")
        return self

    @property
    def metrics(self) -> list[str]:
        return [] if self.metric is None else [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def label(self) -> str:
        if self.value is not None:
            return f"{self.value:g}"
        what = " + ".join(self.metrics) if len(self.metrics) < 2 else f"mean({', '.join(self.metrics)})"
        return f"{what}{f' - {self.minus}' if self.minus else ''} of {self.run}"

    def of(self, run: Run) -> float | None:
        """This side's value for one run (None where a metric is missing)."""
        vals = [run.value(m) for m in self.metrics]
        sub = run.value(self.minus) if self.minus else 0.0
        if any(v is None for v in vals) or sub is None:
            return None
        return float(np.mean(vals)) - sub  # type: ignore[arg-type]


class Claim(_Strict):
    text: str
    lhs: Side
    op: Literal["<", "<=", ">", ">=", "~="]
    rhs: Side
    factor: float = 1.0  # the claim reads: lhs OP factor x rhs
    margin: float | None = None  # relative to the larger side: ratio-scale quantities only
    margin_abs: float | None = None  # in the metric's units
    why: str = ""  # the reason for a factor, margin or threshold: printed with the verdict
    note: str = ""  # decided before the run, printed with the verdict (e.g. what a stand-in can say)
    verdict: bool = True  # False: show the numbers, judge nothing (the source gives nothing to test)

    @model_validator(mode="after")
    def _margins(self) -> Claim:
        log_side = any(is_log_scale(m) for s in (self.lhs, self.rhs) for m in s.metrics)
        if self.margin is not None and log_side:
            raise ValueError("a relative margin on a log quantity (dB) is arbitrary; state margin_abs in its units")
        if self.margin is not None and self.margin_abs is not None:
            raise ValueError("give margin (relative) or margin_abs (in the metric's units), not both")
        if self.op == "~=" and self.margin is None and self.margin_abs is None:
            raise ValueError("an equivalence (~=) needs margin or margin_abs")
        if (self.factor != 1 or self.margin is not None or self.margin_abs is not None or self.rhs.value is not None) and self.verdict and not self.why:
            raise ValueError("a factor, margin or fixed threshold needs a why: the sentence that justifies it")
        return self

    @property
    def log_scale(self) -> bool:
        return any(is_log_scale(m) for s in (self.lhs, self.rhs) for m in s.metrics)


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
    standins: dict[str, str] = {}  # other shards folder -> how a verdict names it ("500 photo crops, not STL10")
    disclosures: list[str] = []  # where our runs differ from the source, printed under its heading
    runs: dict[str, list[str]] = {}  # run -> figure keys to show
    claims: list[Claim] = []
    references: list[Reference] = []


class Study(_Strict):
    title: str = "Results"
    intro: str = ""
    spread_factor: float = 2.0
    clear_margin: float = 0.5
    experiments: dict[str, Experiment] = {}

    def runs_reading(self, prefix: str) -> list[str]:
        """The runs some claim reads a ``prefix`` metric of (``best:`` and the like aside), e.g. ``train_eval/``:
        the runs that need ``launch/evaluate.py --split train``, which costs minutes a run on a CPU."""
        sides = [s for exp in self.experiments.values() for c in exp.claims for s in (c.lhs, c.rhs) if s.run]
        return sorted({s.run for s in sides if any(m.rpartition(":")[2].startswith(prefix)
                                                   for m in [*s.metrics, *([s.minus] if s.minus else [])])})


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


def group_stat(members: Sequence[Run], metric: str | Side) -> Stat | None:
    """Mean ± std over a run group of a metric (or of a claim side, which may combine metrics)."""
    side = metric if isinstance(metric, Side) else Side(run="-", metric=metric)
    vals = [v for r in members if (v := side.of(r)) is not None]
    return Stat.of(vals) if vals else None


@dataclass(frozen=True)
class Rule:
    """The numbers a verdict is decided with (what the report prints as "the threshold actually used")."""
    spread_factor: float = 2.0
    clear_margin: float = 0.5  # relative; ratio-scale quantities only
    margin: float | None = None
    margin_abs: float | None = None
    log_scale: bool = False
    fixed_rhs: bool = False  # the right-hand side is a threshold stated in the study file


def decide(op: str, factor: float, lhs: Stat, rhs: Stat, rule: Rule) -> tuple[str, str]:
    """The verdict on ``lhs OP factor x rhs`` and the rule that gave it, with its numbers."""
    target = factor * rhs.mean
    gap = lhs.mean - target
    stds = [s for s in (lhs.std, None if rhs.std is None else abs(factor) * rhs.std) if s is not None]
    band = rule.spread_factor * max(stds) if stds else None
    # One side repeated, the other run once: the single run's spread is unmeasured and taken to be the
    # measured one. Said in every verdict that rests on it, not assumed quietly.
    once = "" if len(stds) != 1 or rule.fixed_rhs else f" ({'left' if lhs.std is None else 'right'} side run once: its spread taken as the other's)"
    if rule.margin_abs is not None:
        allowed, said = rule.margin_abs, f"the stated margin {rule.margin_abs:g}"
    elif rule.margin is not None:
        allowed = rule.margin * max(abs(lhs.mean), abs(target))
        said = f"{percent(rule.margin)} of the larger side = {allowed:.3g}"
    else:
        allowed, said = None, ""
    if op == "~=":
        if band is None:
            return UNTESTED, f"an equivalence needs measured spread (no side repeated); margin {said}"
        if abs(gap) + band <= allowed:  # type: ignore[operator]
            return HOLDS, f"gap {abs(gap):.3g} + {rule.spread_factor:g} x std {max(stds):.2g} = {abs(gap) + band:.3g} <= margin {said}{once}"
        if abs(gap) - band > allowed:  # type: ignore[operator]
            return FAILS, f"gap {abs(gap):.3g} - {rule.spread_factor:g} x std {max(stds):.2g} = {abs(gap) - band:.3g} > margin {said}{once}"
        return UNTESTED, f"gap {abs(gap):.3g} ± {rule.spread_factor:g} x std {max(stds):.2g} straddles the margin {said}{once}"
    status = HOLDS if OPS[op](lhs.mean, target) else FAILS
    if band is not None:
        if abs(gap) > band:
            return status, f"gap {abs(gap):.3g} > {rule.spread_factor:g} x the {'measured' if once else 'larger'} std {max(stds):.2g} = {band:.3g}{once}"
        return UNTESTED, f"gap {abs(gap):.3g} is within {rule.spread_factor:g} x the run-to-run std {max(stds):.2g} = {band:.3g}{once}"
    if rule.fixed_rhs and allowed is None:
        return status, "one run against the threshold stated in the study file"
    if allowed is None:
        if rule.log_scale:
            return UNTESTED, "no repeats, and a log quantity (dB) needs an absolute margin stated in the study file (margin_abs)"
        allowed = rule.clear_margin * max(abs(lhs.mean), abs(target))
        said = f"{percent(rule.clear_margin)} of the larger side = {allowed:.3g}"
    if abs(gap) > allowed:
        return status, f"no repeats; gap {abs(gap):.3g} > {said}"
    return UNTESTED, f"no repeats for a close comparison (gap {abs(gap):.3g}, {said} needed)"


def percent(fraction: float) -> str:
    """0.025 -> "2.5%": the margin printed as used, never rounded to another one."""
    return f"{fraction * 100:g}%"


def data_of(exp: Experiment, run: Run) -> tuple[bool, str]:
    """(on the source's own data?, what the run trained on)."""
    if run.shards in exp.shards:
        return True, f"{run.shards} ({exp.data})"
    # a stand-in's name already says what it replaces ("Colored Fashion-MNIST, not Colored MNIST")
    return False, f"{run.shards} (stand-in: {exp.standins.get(run.shards, f'other data, not {exp.data}')})"


@dataclass(frozen=True)
class Verdict:
    status: str  # HOLDS, FAILS, UNTESTED or SHOWN
    evidence: str  # both sides' numbers, with the scaled threshold where factor != 1
    rule: str  # why it is decisive or not, with the numbers used
    on: str = ""  # "" on the source's own data, else what it held on ("500 photo crops, not STL10")

    @property
    def mark(self) -> str:
        where = f" on {self.on}" if self.on and self.status in (HOLDS, FAILS) else ""
        return {HOLDS: f"**holds{where}**", FAILS: f"**does not hold{where}**", SHOWN: "*numbers only*"}.get(self.status, "*not tested here*")


def check_claim(claim: Claim, exp: Experiment, groups: dict[str, list[Run]], study: Study,
                under_way: dict[str, str] | None = None) -> Verdict:
    """The verdict on one claim of ``exp`` over the run groups present; ``under_way`` maps a run with no
    finished member to how far it got, said instead of "missing".

    A run stuck at one output (:meth:`Run.collapsed`) is a failed training rather than evidence about
    the claim, but dropping it after the fact would be a choice made on the results: the verdict keeps
    every training seed, names the collapsed run, and adds what the claim gives without it."""
    verdict = _check(claim, exp, groups, study, under_way)
    used = [str(r) for r in dict.fromkeys(s.run for s in (claim.lhs, claim.rhs) if s.run in groups)]
    failed = {m.name: why for run in used for m in groups[run] if (why := m.collapsed())}
    if not failed:
        return verdict
    kept = {b: [m for m in ms if m.name not in failed] for b, ms in groups.items()}
    alt = _check(claim, exp, {b: ms for b, ms in kept.items() if ms}, study, under_way, dropped={b for b in used if not kept[b]})
    evidence = f"{verdict.evidence}; includes a collapsed run: {', '.join(f'{n} ({w})' for n, w in failed.items())}"
    rule = f"{verdict.rule}; without {'it' if len(failed) == 1 else 'them'}: {alt.mark.strip('*')} ({alt.evidence}; {alt.rule})"
    return Verdict(verdict.status, evidence, rule, verdict.on)


def _check(claim: Claim, exp: Experiment, groups: dict[str, list[Run]], study: Study, under_way: dict[str, str] | None,
           dropped: Collection[str] = ()) -> Verdict:
    stats: list[Stat | None] = []
    reasons: list[str] = []
    for side in (claim.lhs, claim.rhs):
        if side.value is not None:
            stats.append(Stat(side.value, None, 1))
            continue
        members = groups.get(str(side.run), [])
        st = group_stat(members, side) if members else None
        if not members:
            progress = (under_way or {}).get(str(side.run))
            reasons.append(f"every finished {side.run} run collapsed" if side.run in dropped else
                           f"run {side.run} unfinished ({progress})" if progress else f"run {side.run} missing")
        elif st is None:
            reasons.append(f"{' / '.join(side.metrics + ([side.minus] if side.minus else []))} missing from {side.run}")
        stats.append(st)
    lhs, rhs = stats
    evidence = f"{_describe(claim.lhs, lhs)} vs {_describe(claim.rhs, rhs)}"
    if claim.factor != 1 and rhs is not None:
        evidence += f"; threshold {claim.factor:g} x {rhs.mean:.4g} = {claim.factor * rhs.mean:.4g}"
    standins: list[str] = []
    for run in dict.fromkeys(s.run for s in (claim.lhs, claim.rhs) if s.run in groups):
        members = groups[str(run)]
        epochs = sorted({int(e) if is_number(e := m.summary.get("epoch")) else -1 for m in members})
        if epochs != [exp.epochs]:
            reasons.append(f"{run} trained {'/'.join(map(str, epochs))} of the source's {exp.epochs} epochs")
        datasets = sorted({m.shards for m in members})
        if len(datasets) > 1:  # a mean over two datasets: its std would measure the data, not the training seed
            reasons.append(f"the {run} runs trained on different data ({', '.join(datasets)})")
        own, _ = data_of(exp, members[0])
        if not own:
            standins.append(exp.standins.get(members[0].shards, f"{members[0].shards}, not {exp.data}"))
    on = "; ".join(dict.fromkeys(standins))
    if reasons or lhs is None or rhs is None:
        return Verdict(UNTESTED, evidence, "; ".join(dict.fromkeys(reasons)) or "a side has no value", on)
    if not claim.verdict:
        return Verdict(SHOWN, evidence, claim.why, on)
    rule = Rule(study.spread_factor, study.clear_margin, claim.margin, claim.margin_abs, claim.log_scale, claim.rhs.value is not None)
    status, why = decide(claim.op, claim.factor, lhs, rhs, rule)
    return Verdict(status, evidence, why, on)


def _describe(side: Side, st: Stat | None) -> str:
    if side.value is not None:
        return f"{side.value:g}"
    return f"{side.label} = {st.fmt('.4g') if st else '–'}"
