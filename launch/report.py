"""Write the results report over finished runs: one Markdown table, the seeds' claims checked, figures, commands.

    python launch/report.py runs/fashion_baseline runs/fashion_rotated ... --out docs/RESULTS.md
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aedist.errors import run_cli


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (runs/NAME)")
    parser.add_argument("--out", default="docs/RESULTS.md", help="Markdown file to write; figures go beside it in figures/")
    args = parser.parse_args(argv)

    from aedist.report import write_report

    print(f"wrote {write_report(args.runs, args.out)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
