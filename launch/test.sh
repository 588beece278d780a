#!/usr/bin/env bash
# Install what the tests need (pip; Fashion-MNIST and SLURM from Debian where root) and run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh --with-slurm
python -m ruff check aedist launch tests   # lint first: seconds, and a style slip fails fast
python -m pytest -q "$@"
