"""Measure throughput: ``python launch/benchmark.py {data,corruption,train,pack} [--json FILE]``.

Prints a table of img/s and peak RSS per case and the ratios between cases of the same run.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence

import torch

from aedist.benchmarks import SUITES
from aedist.errors import run_cli
from aedist.sysinfo import device_name


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--json", help="also write rows and ratios to this JSON file")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case, the median kept (train: interleaved rounds, at most 3, the best kept)")
    parser.add_argument("--shards", default=None, help="shards folder to read (default: the suite's own)")
    parser.add_argument("--only", nargs="+", default=None, help="train suite: just these models (seed000 seed000-rotated stl10 kl-f4)")
    args = parser.parse_args(argv)
    rows, ratios = importlib.import_module(f"aedist.benchmarks.{args.suite}").run(args)
    width = max(len(r["case"]) for r in rows)
    machine = device_name("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine}")  # every figure below is of this machine: CPUs differ between machines of one kind
    print(f"{'case':<{width}}  {'img/s':>14}  {'peak RSS MB':>12}")
    for r in rows:
        rate = f"{r['img_per_s']:,.1f}" if r["img_per_s"] < 100 else f"{r['img_per_s']:,.0f}"  # STL10's ~10-25 img/s keep a decimal
        print(f"{r['case']:<{width}}  {rate:>14}  {r['peak_rss_mb']:>12,.1f}")
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "rows": rows, "ratios": ratios}, fh, indent=2)
    return 0


if __name__ == "__main__":
    run_cli(main)
