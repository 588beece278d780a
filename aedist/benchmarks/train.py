"""Train suite: the seed's plain PyTorch loop vs the engine, same model, data and batch size.

    python launch/benchmark.py train [--json FILE] [--shards shards/fashion]

Cases (each in its own process, so peak RSS is per case):
- ``plain``: seed 000's loop, a DataLoader over a TensorDataset of float images, Adam, MSE;
- ``engine``: ``launch/train.py`` in one process (block shards, on-device float conversion);
- ``engine_ddp2``: the engine under ``accelerate launch`` with 2 gloo processes (CPU DDP).
Throughput counts training images per second of the step loop; evaluation is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aedist.benchmarks import Row, row, vm_hwm_mb

STEPS, BATCH = 300, 64
ROOT = Path(__file__).resolve().parents[2]


def _plain(shards: str, steps: int) -> dict[str, float]:
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from aedist.config import ModelConfig
    from aedist.data import load_batches
    from aedist.models import build_model

    # The seed loads the whole split into float tensors up front; so does this baseline.
    xs = [x.numpy() for x, _ in load_batches(shards, "train", 4096, shuffle=False, drop_last=False)]
    data = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()
    loader = DataLoader(TensorDataset(data, torch.zeros(len(data))), batch_size=BATCH, shuffle=True, drop_last=True)
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for x, _ in loader:
            loss = loss_fn(model(x).recon, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            done += 1
            if done == steps:
                break
    return {"img_per_s": steps * BATCH / (time.perf_counter() - t0), "peak_rss_mb": vm_hwm_mb()}


def _engine_cmd(shards: str, run_dir: str, name: str, steps: int, procs: int) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    head = launch if procs > 1 else [sys.executable]
    return head + [str(ROOT / "launch/train.py"), f"data.shards={shards}", f"run.dir={run_dir}", f"run.name={name}",
                   f"data.batch_size={BATCH}", f"train.max_steps={steps}", "train.epochs=1000", "log.wandb=disabled",
                   f"log.every={steps}", "train.resume=never", "eval.knn_train=10", "log.probe_size=8", "data.limit=0"]


def _engine(shards: str, steps: int, procs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        name = f"bench{procs}"
        proc = subprocess.run(_engine_cmd(shards, tmp, name, steps, procs), capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        summary = json.loads((Path(tmp) / name / "summary.json").read_text())
        return {"img_per_s": summary["img_per_s"], "peak_rss_mb": summary["peak_rss_mb"]}  # rank 0's VmHWM


def _plain_in_child(shards: str, steps: int) -> dict[str, float]:
    """The plain loop in a fresh process, so its peak RSS is its own."""
    proc = subprocess.run([sys.executable, "-m", "aedist.benchmarks.train", shards, str(steps)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    """Median img/s per case over ``args.repeats`` whole training runs, interleaved across cases."""
    shards = args.shards or "shards/fashion"
    if not (ROOT / shards / "manifest.json").exists() and not Path(shards, "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "launch/pack.py"), "fashion-mnist", "--out", shards], check=True, cwd=ROOT)
    repeats = max(1, args.repeats)
    results: dict[str, list[dict[str, float]]] = {"plain": [], "engine": [], "engine_ddp2": []}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits every case alike
        results["plain"].append(_plain_in_child(shards, STEPS))
        results["engine"].append(_engine(shards, STEPS, 1))
        results["engine_ddp2"].append(_engine(shards, STEPS, 2))
    rows, medians = [], {}
    for case, runs in results.items():
        rates = sorted(r["img_per_s"] for r in runs)
        medians[case] = rates[len(rates) // 2]
        rows.append(row("train", f"{case} (conv AE, batch {BATCH}, {STEPS} steps)", medians[case], max(r["peak_rss_mb"] for r in runs)))
    ratios = {"engine/plain": medians["engine"] / medians["plain"], "engine_ddp2/plain": medians["engine_ddp2"] / medians["plain"]}
    return rows, ratios


if __name__ == "__main__":
    shards_dir, n = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("WANDB_SILENT", "true")
    print(json.dumps(_plain(shards_dir, n)))
