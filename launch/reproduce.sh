#!/usr/bin/env bash
# Reproduce the five seed experiments on this machine kind (2 CPU cores, no MNIST/STL10 download):
# short schedules, Fashion-MNIST and Colored Fashion-MNIST for the MNIST-based seeds, 96x96 photo
# crops for STL10. Then evaluate every run and write docs/RESULTS.md. About an hour on 2 cores.
#   bash launch/reproduce.sh            (EPOCHS_SCALE=2 doubles every schedule)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}"
s="${EPOCHS_SCALE:-1}"

python launch/pack.py fashion-mnist --out shards/fashion4 --classes 1,3,5,8 --val-fraction 0.1
python launch/pack.py fashion-mnist --out shards/fashion --val-fraction 0.1
python launch/pack.py colored-mnist --base fashion-mnist --out shards/colored-fashion --val-fraction 0.1
[[ -d data/photo96 ]] || python -m aedist.data.standins data/photo96 500 200  # 27M-param model: ~4 img/s on 2 cores
python launch/pack.py folder --source data/photo96 --size 96 --out shards/photo96 --val-fraction 0.1

train() { python launch/train.py --config "configs/$1.yaml" "${@:2}" log.every=50; }
# seed 000: same schedule for both, so the rotated-input comparison is fair
train fashion_baseline train.epochs=$((8 * s))
train fashion_rotated train.epochs=$((8 * s))
# seed 002
for c in fashion_ae fashion_vae fashion_rot90 fashion_jigsaw; do train $c train.epochs=$((10 * s)); done
# seed 003 on Colored Fashion-MNIST
for c in colored_denoise_ae colored_denoise_reg colored_denoise_vae; do
  train $c data.shards=shards/colored-fashion train.epochs=$((4 * s))
done
# seed 004 on Fashion-MNIST
train mnist_mlp data.shards=shards/fashion train.epochs=$((25 * s))
# seed 001 on 96x96 photo crops (2 classes); the four variants share one schedule
for c in stl10_compress stl10_dropout stl10_norm stl10_norm_dropout; do
  train $c data.shards=shards/photo96 train.epochs=$((8 * s)) train.eval_every=2 log.probe_size=16
done

runs=(fashion_baseline fashion_rotated fashion_ae fashion_vae fashion_rot90 fashion_jigsaw
      colored_denoise_ae colored_denoise_reg colored_denoise_vae mnist_mlp
      stl10_compress stl10_dropout stl10_norm stl10_norm_dropout)
for r in "${runs[@]}"; do python launch/evaluate.py "runs/$r"; done
python launch/report.py "${runs[@]/#/runs/}" --out docs/RESULTS.md
