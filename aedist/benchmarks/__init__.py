"""Benchmark suites for ``python launch/benchmark.py SUITE [--json FILE]``.

Each suite module exposes ``run(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]``:
rows of measured throughput and the ratios between cases of that same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypedDict

from aedist.sysinfo import peak_rss_mb, vm_hwm_mb  # noqa: F401  (re-exported for the suites)

SUITES = ("data", "corruption", "train", "pack")


class Row(TypedDict):
    suite: str
    case: str
    img_per_s: float
    peak_rss_mb: float




def median_rate(fn: Callable[[], int], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median items/s over ``repeats`` calls of ``fn`` (which returns how many items it processed)."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        n = fn()
        if sync:
            sync()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def row(suite: str, case: str, img_per_s: float, rss_mb: float | None = None) -> Row:
    """A result row; peak RSS defaults to this process's peak so far."""
    return Row(suite=suite, case=case, img_per_s=round(img_per_s, 1), peak_rss_mb=round(rss_mb if rss_mb is not None else peak_rss_mb(), 1))
