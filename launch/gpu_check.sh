#!/usr/bin/env bash
# One prepared check of a machine with one NVIDIA GPU, under 8 minutes; writes docs/bench/gpu.md.
#
#   bash launch/gpu_check.sh                 # packages already installed
#   bash launch/gpu_check.sh --wheels DIR    # install what is missing from a folder of wheels (no network)
#
# 1. `pytest -m cuda`: bf16 autocast, channels_last, compile with CUDA graphs, pinned non_blocking copies
#    on a side stream, no host sync between log intervals (torch.cuda.set_sync_debug_mode("error"));
# 2. `launch/benchmark.py train` on CUDA: the plain fp32 loop, the plain fast path, engine defaults,
#    engine + compile, for the overhead-bound MLP, seed 000 and the STL10 model (synthetic images);
# 3. seed 000's img/s with data, corruption (5 rotated copies) and logging on, MFU of the STL10 model.
# GPU images often carry torch, accelerate and einops but not the rest; the script names what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=""
[[ "${1:-}" == "--wheels" ]] && WHEELS="${2:?--wheels needs a folder}"

NEED=(torch torchvision accelerate wandb webdataset einops yaml pydantic matplotlib sklearn tqdm threadpoolctl fsspec diffusers safetensors torchmetrics lpips pytorch_fid pytest)
declare -A PIP=([yaml]=pyyaml [sklearn]=scikit-learn [pytorch_fid]=pytorch-fid)
missing=()
for mod in "${NEED[@]}"; do python -c "import $mod" 2>/dev/null || missing+=("${PIP[$mod]:-$mod}"); done
if ((${#missing[@]})); then
  if [[ -z "$WHEELS" ]]; then
    echo "error: missing packages: ${missing[*]}; pass --wheels DIR with their wheels (pip download them where there is network)" >&2
    exit 2
  fi
  python -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}"
fi
python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || { echo "error: no CUDA device visible to torch" >&2; exit 2; }

export WANDB_MODE=offline WANDB_SILENT=true
OUT=docs/bench/gpu.md
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p docs/bench
python - "$TMP/synth28" <<'EOF'
# Fashion-MNIST-sized stand-in (60,000 train images of 1x28x28, 4 classes): pixel values do not change the arithmetic.
import sys
import numpy as np
from aedist.data import write_shards
rng = np.random.default_rng(0)
split = lambda n: (rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 4, n).astype(np.int64))
write_shards(sys.argv[1], {"train": split(24000), "test": split(2000)}, ["a", "b", "c", "d"])
EOF

{
  echo "# GPU check ($(date -u +%Y-%m-%d))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  python -c "import torch, accelerate; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| accelerate', accelerate.__version__, '| bf16', torch.cuda.is_bf16_supported())"
  echo '```'
  echo
  echo "## pytest -m cuda"
  echo
  echo '```'
  timeout 150 python -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tail -n 15 || echo "(pytest exit $?)"
  echo '```'
  echo
  echo "## launch/benchmark.py train (CUDA)"
  echo
  echo '```'
  timeout 270 python launch/benchmark.py train --only mlp-overhead seed000 stl10 --repeats 1 --shards "$TMP/synth28" \
    --json docs/bench/gpu_train.json 2>/dev/null || echo "(benchmark exit $?)"
  echo '```'
  echo
  echo "## seed 000 with data, corruption and logging (fashion_rotated, 300 steps)"
  echo
  echo '```'
  timeout 150 python launch/train.py --config configs/seeds/fashion_rotated.yaml data.shards="$TMP/synth28" run.dir="$TMP/runs" \
    train.max_steps=300 log.every=50 eval.knn_train=100 > "$TMP/seed000.log" 2>&1 || echo "(train exit $?)"
  python - "$TMP/runs/fashion_rotated" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train/img_per_s"' in line]
for r in rows:
    print(f"step {r['step']:4d}  {r['train/img_per_s']:9.0f} img/s  {r['train/tflops']:7.2f} TFLOP/s  MFU {r.get('train/mfu', float('nan')):.1%}"
          f"  data wait {r['train/data_wait_share']:.1%}  peak {r['train/peak_mem_gb']:.2f} GB")
s = json.loads((run / "summary.json").read_text())
print({k: s[k] for k in ("img_per_s", "tflops", "mfu", "data_wait_share", "mixed_precision", "channels_last", "compile") if k in s})
EOF
  echo '```'
} > "$OUT" 2>&1
cat "$OUT"
