"""The `auto` speed settings (bf16 + channels_last where native) vs fp32 on short seed-000 and seed-003 runs, 3 training seeds each.

    python launch/numerics.py [--seeds 0,1,2] [--out docs/bench/numerics]

Prints each run's final test MSE and a mean ± std table; writes OUT.txt, OUT.md and OUT.json.
"""

from __future__ import annotations

from aedist.benchmarks.numerics import main
from aedist.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
