"""Train suite: the seed's plain fp32 loop vs the engine, for seed 000 and the STL10 model.

    python launch/benchmark.py train [--json FILE] [--shards shards/fashion4] [--repeats N] [--only kl-f4]

Models: seed 000's conv AE (195,459 params) as the baseline trains it (``configs/seeds/
fashion_baseline.yaml``: batch 64 of 1x28x28, real Fashion-MNIST classes 1,3,5,8) and as the
rotation-trained variant trains it (``fashion_rotated_inbatch.yaml``: each image plus 5 rotated copies =
384 inputs a step, the batch the issue's table measured), and seed 001's 27.4M-parameter STL10 AE
(``configs/seeds/stl10_compress.yaml``: batch 64 of 3x96x96; synthetic images, since STL10 cannot
be downloaded here and pixel values do not change the arithmetic), and the latent-diffusion recipe
``configs/recipes/kl_f4.yaml`` (diffusers AutoencoderKL, f=4, batch 16 of synthetic 3x64x64, L1 +
beta KL, EMA on), whose extra case ``engine + lpips_gan`` takes the same step with the PatchGAN
discriminator on from step 1 (both networks' forward and backward, the adaptive weight's two
gradients). Cases, each in its own process
(so peak RSS is its own):

- ``plain``: the seed's loop in fp32: a DataLoader over an in-memory TensorDataset (for the
  rotated variant the copies are made once up front, so the loop pays nothing for them), Adam, MSELoss;
- ``engine defaults``: ``launch/train.py`` with every ``auto`` left alone (what this machine
  resolves them to is printed in the case name); compile resolves off at this run length;
- ``engine defaults + compile``: the same with ``train.compile=true``, as ``auto`` resolves it for
  the seeds' full schedules; its warm-up (first window minus a steady one) is reported apart;
- ``engine fp32``: ``train.mixed_precision=no train.channels_last=false train.compile=false``,
  the plain loop's numerics and layout: what the engine itself costs or saves;
- ``plain fast path`` (where this machine runs bf16 natively): the same plain loop with bf16
  autocast and channels_last, what the hardware gives the bare model with the engine's settings and
  no engine at all: the ceiling for ``engine defaults``, so that ratio says how much of the
  hardware's gain the engine keeps, and ``plain fast path/plain`` what a goal can ask of it here.

The cases of a model run interleaved over ``min(--repeats, MAX_ROUNDS)`` rounds, each round in a
rotated order, so a load change on the (shared) machine hits every case alike; each case's figure
is its best round (see :func:`_best_run`); every round's figures go to stderr. Throughput is
model inputs per second in the steady state: the median
over windows of ``window`` steps after the first window (which holds allocator warm-up, oneDNN
primitive creation and, when compiling, the compile); evaluation is not timed. Ratios are
against ``plain`` of the same run; the load average after each case goes to stderr and the JSON.
The engine cases share an Inductor cache folder that starts empty, so the first compile is cold
and later rounds' are warm, as a resumed run's is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aedist.benchmarks import Row, row, vm_hwm_mb
from aedist.precision import cpu_supports_bf16

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Bench:
    """One model of the suite: its config, how many steps each case runs and the timing window."""

    key: str
    config: str
    steps: int
    window: int
    engine_cases: tuple[str, ...] = ("engine defaults", "engine defaults + compile", "engine fp32")
    rounds: int = 3  # at most; --repeats lowers it
    overrides: tuple[str, ...] = ()  # applied to the config in every case, the plain loop's included


BENCHES = [
    # Overhead-bound: seed 004's MLP AE (622,504 params) at batch 64, a step of ~1 ms here, so per-step Python
    # and host-device syncs, not arithmetic, decide the rate (what the sync-free step is measured on).
    Bench("mlp-overhead", "configs/seeds/mnist_mlp.yaml", steps=1200, window=100, engine_cases=("engine defaults", "engine fp32"),
          overrides=("data.batch_size=64", "eval.corruptions={}", "optim.scheduler=none")),
    Bench("seed000", "configs/seeds/fashion_baseline.yaml", steps=400, window=50),  # ~25-35 ms a step here
    Bench("seed000-rotated", "configs/seeds/fashion_rotated_inbatch.yaml", steps=150, window=25),  # 384 inputs, ~0.15-0.3 s a step
    Bench("stl10", "configs/seeds/stl10_compress.yaml", steps=12, window=2),  # ~3-7 s a step here: few steps
    # The latent-diffusion recipe (diffusers AutoencoderKL, f=4) with its reconstruction objective, and the
    # same model and step under lpips_gan with the discriminator on from step 1 (perceptual weight 0:
    # no LPIPS weights on an offline machine; the README gives LPIPS's own cost apart).
    Bench("kl-f4", "configs/recipes/kl_f4.yaml", steps=16, window=4, engine_cases=("engine defaults", "engine fp32", "engine + lpips_gan"), rounds=1),
]
MAX_ROUNDS = 3  # interleaved rounds per model (STL10's five cases take ~6 min a round here)
ENGINE_CASES = {
    "engine defaults": [],
    "engine defaults + compile": ["train.compile=true"],
    "engine fp32": ["train.mixed_precision=no", "train.channels_last=false", "train.compile=false"],
    "engine + lpips_gan": ["objective.name=lpips_gan", "objective.params={perceptual_weight: 0.0, disc_start: 0}"],
}
STL10_IMAGES = 1024  # synthetic train images: an epoch (16 steps) outlasts the run, so no epoch-end eval or checkpoint


def _growth(config: str) -> int:
    """Inputs per loaded image: the product of (n + 1) over ``copies`` corruptions."""
    from aedist.config import load_config
    from aedist.data.corruption import validate_spec

    return math.prod(e["copies"]["n"] + 1 for e in validate_spec(load_config(ROOT / config).corruption) if "copies" in e)


def _steady(window_rates: list[float]) -> tuple[float, float]:
    """(median rate over the windows after the first, rate of the first window)."""
    return statistics.median(window_rates[1:]), window_rates[0]


def _warmup_s(first: float, steady: float, images_per_window: int) -> float:
    """Seconds the first window took beyond a steady window."""
    return images_per_window / first - images_per_window / steady


# ----------------------------------------------------------------------------- the plain loop (child process)


def _plain(config: str, shards: str, steps: int, window: int, fast: bool = False, overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """The seed's fp32 loop for ``config``'s model on ``shards`` (``fast``: bf16 autocast + channels_last),
    on CUDA where there is one (batches copied from pinned memory as a DataLoader user does); steady
    inputs/s and peak memory (RSS, or CUDA's peak allocation)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from aedist.config import load_config
    from aedist.data import load_batches
    from aedist.data.corruption import corrupt, make_generator
    from aedist.losses import compute_loss
    from aedist.models import build_model

    cfg = load_config(ROOT / config, list(overrides))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The seed holds its training set in memory as floats; 4096 originals (x6 with rotated copies)
    # are plenty for shuffled batches and keep the baseline's RSS about the loop, not the data.
    xs = [x for x, _ in load_batches(shards, "train", 4096, shuffle=False, drop_last=False, limit=4096)]
    clean = torch.cat(xs).float() / 255.0
    clean = clean * 2 - 1 if cfg.data.normalize else clean
    inputs, targets, _ = corrupt(clean, cfg.corruption, make_generator(0, 0, 0, "cpu")) if cfg.corruption else (clean, clean, {})
    batch = cfg.data.batch_size * (len(inputs) // len(clean))
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    layout = torch.channels_last if fast else torch.contiguous_format
    model = model.to(memory_format=layout)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=batch, shuffle=True, drop_last=True, pin_memory=dev.type == "cuda")
    rates: list[float] = []
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with torch.autocast(dev.type, torch.bfloat16, enabled=fast):
                out = model(x.contiguous(memory_format=layout))
            loss = compute_loss(out, y, cfg.loss)["loss"]  # the seeds' MSE; L1 + beta * KL for the KL recipe
            loss.backward()
            opt.step()
            opt.zero_grad()
            done += 1
            if done % window == 0:
                if dev.type == "cuda":
                    torch.cuda.synchronize()  # time what the device did, not what the host queued
                now = time.perf_counter()
                rates.append(window * batch / (now - t0))
                t0 = now
            if done == steps:
                break
    steady, first = _steady(rates)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else vm_hwm_mb()
    return {"img_per_s": steady, "warmup_s": _warmup_s(first, steady, window * batch), "peak_rss_mb": peak,
            "settings": "bf16, channels_last, eager" if fast else "fp32, NCHW, eager"}


def _plain_in_child(config: str, shards: str, steps: int, window: int, fast: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    proc = subprocess.run([sys.executable, "-m", "aedist.benchmarks.train", config, shards, str(steps), str(window), str(int(fast)), *overrides],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the engine


def _engine(bench: Bench, shards: str, overrides: list[str], growth: int, inductor_cache: str) -> dict:
    """One ``launch/train.py`` run; steady inputs/s from its metrics.jsonl windows, RSS and the
    settings the engine resolved from its summary.json."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / bench.config),
               f"data.shards={shards}", f"run.dir={tmp}", "run.name=bench", f"train.max_steps={bench.steps}",
               "train.epochs=1000", "log.wandb=disabled", f"log.every={bench.window}", "train.resume=never",
               "eval.knn_train=10", "log.probe_size=8", "data.limit=0", *bench.overrides, *overrides]
        env = {**os.environ, "WANDB_SILENT": "true", "TORCHINDUCTOR_CACHE_DIR": inductor_cache}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
        run = Path(tmp) / "bench"
        summary = json.loads((run / "summary.json").read_text())
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # train/img_per_s counts loaded images; x growth = model inputs, as the plain loop counts.
    rates = [m["train/img_per_s"] * growth for m in lines if "train/img_per_s" in m]
    steady, first = _steady(rates)
    mp = summary["mixed_precision"]
    settings = f"{'fp32' if mp == 'no' else mp}, {'channels_last' if summary['channels_last'] else 'NCHW'}, {'compiled' if summary['compile'] else 'eager'}"
    per_window = bench.window * _batch(bench) * growth
    res = {"img_per_s": steady, "warmup_s": _warmup_s(first, steady, per_window), "peak_rss_mb": summary["peak_rss_mb"], "settings": settings}
    mfu = [m["train/mfu"] for m in lines if "train/mfu" in m][1:]  # GPUs in the peak table only
    if mfu:
        res["mfu"] = statistics.median(mfu)
    return res


def _batch(bench: Bench) -> int:
    """The config's data.batch_size (loaded images a step, before any copies)."""
    from aedist.config import load_config

    return load_config(ROOT / bench.config, list(bench.overrides)).data.batch_size


# ----------------------------------------------------------------------------- data


def _fashion4(shards: str | None) -> str:
    """Seed 000's shards (real Fashion-MNIST, classes 1,3,5,8, no val split), packed if missing."""
    out = shards or "shards/fashion4"
    if not Path(out, "manifest.json").exists() and not (ROOT / out / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "launch/pack.py"), "fashion-mnist", "--out", out, "--classes", "1,3,5,8",
                        "--val-fraction", "0"], check=True, cwd=ROOT)
    return str(Path(out) if Path(out).is_absolute() else ROOT / out)


def _synthetic(tmp: Path, name: str, size: int, channels: int = 3) -> str:
    import numpy as np

    from aedist.data.shards import write_shards

    rng = np.random.default_rng(0)
    n_train = STL10_IMAGES if channels == 3 else 65536  # the MLP's epoch (1024 steps of 64) outlasts its run
    splits = {split: (rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8), rng.integers(0, 2, n).astype(np.int64))
              for split, n in (("train", n_train), ("test", 64))}
    write_shards(tmp / name, splits, ["a", "b"], source={"dataset": f"synthetic {channels}x{size}x{size} (benchmark)"})
    return str(tmp / name)


# ----------------------------------------------------------------------------- the suite


def _native_bf16() -> bool:
    """Where the plain loop's fast path exists: CUDA with bf16, else a CPU with AMX or AVX-512 BF16."""
    import torch

    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_supports_bf16()


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    """Per model: steady inputs/s and peak RSS of the plain loop and each engine case; ratios to plain."""
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    rounds = max(1, min(getattr(args, "repeats", MAX_ROUNDS), MAX_ROUNDS))
    print(f"load average at start: {_load()}; {rounds} interleaved round(s) per model", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        fashion = _fashion4(args.shards) if not getattr(args, "only", None) or {"seed000", "seed000-rotated"} & set(args.only) else ""
        data = {"seed000": fashion, "seed000-rotated": fashion, "stl10": _synthetic(Path(tmp), "stl10", 96), "kl-f4": _synthetic(Path(tmp), "kl", 64),
                "mlp-overhead": _synthetic(Path(tmp), "mnist", 28, channels=1)}
        for bench in [b for b in BENCHES if not getattr(args, "only", None) or b.key in args.only]:
            shards, growth = data[bench.key], _growth(bench.config)
            what = f"{bench.key} ({Path(bench.config).stem}, {_batch(bench) * growth} inputs/step, {bench.steps} steps)"
            # the bare loop on the fast path, where the CPU runs bf16 natively (the engine's own rule)
            cases = ["plain", *(["plain fast path"] if _native_bf16() else []), *bench.engine_cases]
            runs: dict[str, list[dict]] = {c: [] for c in cases}
            for r in range(min(rounds, bench.rounds)):
                for case in cases[r % len(cases):] + cases[:r % len(cases)]:
                    if case.startswith("plain"):
                        res = _plain_in_child(bench.config, shards, bench.steps, bench.window, fast=case != "plain", overrides=bench.overrides)
                    else:
                        res = _engine(bench, shards, ENGINE_CASES[case], growth, str(Path(tmp) / "inductor"))
                    res["load"] = os.getloadavg()[0]
                    runs[case].append(res)
                    print(f"{bench.key} round {r + 1} {case}: {res}", file=sys.stderr, flush=True)
            results = {c: _best_run(rs) for c, rs in runs.items()}
            for case, res in results.items():
                rows.append(row("train", f"{what} {case}: {res['settings']}", res["img_per_s"], res["peak_rss_mb"]))
            plain = results["plain"]["img_per_s"]
            for case in bench.engine_cases:
                ratios[f"{bench.key} {case}/plain"] = results[case]["img_per_s"] / plain
                if "mfu" in results[case]:
                    ratios[f"{bench.key} {case} MFU"] = results[case]["mfu"]
            if "engine + lpips_gan" in results:
                ratios[f"{bench.key} lpips_gan step/reconstruction step (engine defaults)"] = (
                    results["engine + lpips_gan"]["img_per_s"] / results["engine defaults"]["img_per_s"])
            if "plain fast path" in results:
                ceiling = results["plain fast path"]["img_per_s"]
                ratios[f"{bench.key} plain fast path/plain (what the hardware gives the bare loop)"] = ceiling / plain
                ratios[f"{bench.key} engine defaults/plain fast path (share of it the engine keeps)"] = results["engine defaults"]["img_per_s"] / ceiling
            for r, res in enumerate(runs.get("engine defaults + compile", [])):
                # Round 1 compiles into an empty Inductor cache; later rounds find its code there, as
                # a resumed run does (the FX-graph and AOTAutograd caches are on by default).
                ratios[f"{bench.key} compile warm-up s, round {r + 1} ({'cold' if r == 0 else 'warm'} cache)"] = res["warmup_s"]
            ratios[f"{bench.key} load average (1 min, mean over cases)"] = statistics.mean(r["load"] for rs in runs.values() for r in rs)
    print(f"load average at end: {_load()}", file=sys.stderr)
    return rows, ratios


def _best_run(runs: list[dict]) -> dict:
    """One case's rounds folded: its best (least disturbed) round's img/s, the largest peak RSS, the
    settings (the same every round). On a shared 2-core machine another process's burst can slow a
    2-thread run several-fold (threads wait for each other at every op), so a bad round says more
    about the neighbours than about the case; the best round is the case's own speed, as timeit's minimum."""
    best = max(runs, key=lambda r: r["img_per_s"])
    out = {"img_per_s": best["img_per_s"], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "settings": best["settings"]}
    if "mfu" in best:
        out["mfu"] = best["mfu"]
    return out


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    config_arg, shards_arg, steps_arg, window_arg, fast_arg = sys.argv[1:6]
    print(json.dumps(_plain(config_arg, shards_arg, int(steps_arg), int(window_arg), fast=fast_arg == "1", overrides=tuple(sys.argv[6:]))))
