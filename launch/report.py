"""Write the results report over finished runs: a table, a study's claims checked, loss curves, figures, commands.

    python launch/report.py docs/runs/* runs/* --claims configs/seeds/claims.yaml --out docs/RESULTS.md \
        --records docs/runs [--import X]

Of two folders with one name (a record in docs/runs and the live run), the finished one counts, else the
one listed last. --records writes each finished run's record (config, summary, eval files, per-epoch
metrics, the figures shown; no checkpoints) so the report can be rebuilt without runs/.

The extensions the runs imported (the union of ``imports`` in their config.yaml) are imported first; --import adds more.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from aedist.errors import run_cli


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (runs/NAME); NAME-s1, NAME-s2 … count as repeats of NAME")
    parser.add_argument("--claims", default=None, help="study file: claims, schedules, data, reference numbers, figures "
                        "(e.g. configs/seeds/claims.yaml); without it, only the table, curves and figures")
    parser.add_argument("--out", default="docs/RESULTS.md", help="Markdown file to write; figures go beside it in figures/")
    parser.add_argument("--records", default=None, metavar="DIR",
                        help="write each finished run's record to DIR/NAME (commit it: the report can be rebuilt from it)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="also import this module or .py file (each run's recorded imports are always imported); repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")  # skipped lines, left-out folders

    from aedist.loading import import_run_extensions
    from aedist.report import write_report

    import_run_extensions(args.runs, args.imports)  # what the runs were trained with, before anything reads them
    print(f"wrote {write_report(args.runs, args.out, claims=args.claims, records=args.records)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
