#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: install, get real Fashion-MNIST, pack the
# seed-000 subset (Trouser, Dress, Sandal, Bag) into shards, train the rotation-trained conv AE on a
# short schedule, evaluate it, and print where the figures and the offline W&B run are.
#   bash launch/quickstart.sh [key=value ...]      e.g. train.epochs=51 for the seed's full schedule
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
python launch/pack.py fashion-mnist --out shards/fashion4 --classes 1,3,5,8 --val-fraction 0
export WANDB_MODE="${WANDB_MODE:-offline}"
python launch/train.py --config configs/seeds/fashion_rotated.yaml train.epochs=3 "$@"
run=$(python -m aedist.config --run-dir configs/seeds/fashion_rotated.yaml train.epochs=3 "$@")
python launch/evaluate.py "$run"
echo
echo "run folder:   $run"
echo "figures:      $run/figures/   (recon, rotation_panel, latent, interpolation, ...)"
echo "metrics:      $run/metrics.jsonl and $run/eval.json"
echo "W&B (offline): $(ls -d "$run"/wandb/offline-run-* | tail -n 1)   -> upload with: wandb sync $run/wandb/offline-run-*"
