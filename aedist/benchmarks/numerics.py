"""Numerics check: do the ``auto`` speed settings train to the same test MSE as fp32?

    python launch/numerics.py [--seeds 0,1,2] [--out docs/bench/numerics]

Seed 000 (``fashion_baseline``, conv AE with a 2-D latent, batch 64, shards/fashion4) and seed 003
(``colored_denoise_ae``, denoising conv AE, batch 128, shards/colored-fashion) each trained on a
short schedule (``train.max_steps``: seed 000 300 steps, under one epoch; seed 003 1000 steps, 2.4
epochs, since it sits on a plateau for its first ~400; the figures come from the one evaluation at
the end) in two settings, three training seeds each:

- ``fp32``: ``train.mixed_precision=no train.channels_last=false``
- ``auto``: ``train.mixed_precision=auto train.channels_last=auto``, the defaults, which resolve
  to bf16 autocast + channels_last on a CPU with native bf16 (what each run resolved to is
  printed and stored; on a CPU without it ``auto`` is fp32 + channels_last and the check is moot)

both with ``train.compile=false`` and the eval corruptions off (the test MSE on clean inputs is
the figure compared). Reported: final test MSE per run, mean ± sample std per setting, and whether
the auto-fp32 difference of means lies within two standard errors of that difference (the
run-to-run noise). Writes OUT.txt (what it prints), OUT.md (the table) and OUT.json (every run).
Shards are packed first if missing (real Fashion-MNIST, as the README's Packing section).
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Experiment:
    """A seed config on a short schedule and the command that packs its shards."""

    name: str
    config: str
    shards: str
    pack: list[str]
    steps: int
    extra: tuple[str, ...] = ()  # more overrides, e.g. to keep the final evaluation short


EXPERIMENTS = [
    Experiment("seed000 fashion_baseline", "configs/seeds/fashion_baseline.yaml", "shards/fashion4",
               ["fashion-mnist", "--out", "shards/fashion4", "--classes", "1,3,5,8", "--val-fraction", "0"], steps=300),
    Experiment("seed003 colored_denoise_ae", "configs/seeds/colored_denoise_ae.yaml", "shards/colored-fashion",
               ["colored-mnist", "--base", "fashion-mnist", "--out", "shards/colored-fashion", "--val-fraction", "0.1"], steps=1000,
               # Seed 003 predicts the mean image (train loss ~0.084-0.093) for its first ~350-400 steps
               # whatever the precision, then learns (0.010 at step 1000): a shorter run compares two
               # constant predictions. Evaluated once, at the end (1000 steps = 2.4 epochs).
               extra=("train.eval_every=1000",)),
]
SETTINGS = {
    "fp32": ["train.mixed_precision=no", "train.channels_last=false"],
    "auto": ["train.mixed_precision=auto", "train.channels_last=auto"],
}


def _train(exp: Experiment, setting: str, seed: int, run_dir: str) -> dict[str, float]:
    """One short training run; its final test MSE and wall time from summary.json."""
    name = f"{exp.config.split('/')[-1].removesuffix('.yaml')}-{setting}-s{seed}"
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / exp.config), f"data.shards={ROOT / exp.shards}",
           f"run.dir={run_dir}", f"run.name={name}", f"train.seed={seed}", f"train.max_steps={exp.steps}", "train.epochs=1000",
           "train.compile=false", "train.resume=never", "log.wandb=disabled", "log.every=50", "eval.corruptions={}",
           "eval.knn_train=500", *exp.extra, *SETTINGS[setting]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "WANDB_SILENT": "true"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    summary = json.loads((Path(run_dir) / name / "summary.json").read_text())
    return {"test_mse": summary["test/mse"], "wall_s": time.perf_counter() - t0, "train_img_per_s": summary["img_per_s"],
            "mixed_precision": summary["mixed_precision"], "channels_last": summary["channels_last"]}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(runs: dict[str, list[float]], n: int) -> dict[str, float | bool]:
    """fp32 vs auto test MSEs of one experiment: means, stds, the difference and its noise band
    (two standard errors of a difference of two means of ``n`` runs each)."""
    (m32, s32), (ma, sa) = _stats(runs["fp32"]), _stats(runs["auto"])
    band = 2 * math.sqrt(s32**2 / n + sa**2 / n)
    return {"fp32_mean": m32, "fp32_std": s32, "auto_mean": ma, "auto_std": sa, "diff": ma - m32, "noise_band": band,
            "within_noise": abs(ma - m32) <= band}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (train.seed), comma-separated")
    parser.add_argument("--out", default="docs/bench/numerics", help="writes OUT.txt, OUT.md and OUT.json")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    lines: list[str] = [f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
                        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset (torch default)')}"]

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for exp in EXPERIMENTS:
            if not (ROOT / exp.shards / "manifest.json").exists():
                subprocess.run([sys.executable, str(ROOT / "launch/pack.py"), *exp.pack], check=True, cwd=ROOT)
            runs: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
            for seed in seeds:  # settings interleaved per seed, so load drift hits both alike
                for setting in SETTINGS:
                    r = _train(exp, setting, seed, tmp)
                    runs[setting].append(r)
                    say(f"{exp.name} {setting} seed {seed}: test MSE {r['test_mse']:.5f}  ({r['wall_s']:.0f} s, "
                        f"{r['train_img_per_s']:.0f} img/s train, mixed_precision={r['mixed_precision']} channels_last={r['channels_last']})")
            cmp = compare({s: [r["test_mse"] for r in rs] for s, rs in runs.items()}, len(seeds))
            results[exp.name] = {"steps": exp.steps, "config": exp.config, "runs": runs, **cmp}
    table = ["| experiment (steps) | fp32 test MSE | auto test MSE (resolved to) | auto - fp32 | noise band (2 SE) | within noise |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        first = r["runs"]["auto"][0]
        how = f"{'fp32' if first['mixed_precision'] == 'no' else first['mixed_precision']}{' + channels_last' if first['channels_last'] else ''}"
        table.append(f"| {name} ({r['steps']}) | {r['fp32_mean']:.5f} ± {r['fp32_std']:.5f} | {r['auto_mean']:.5f} ± {r['auto_std']:.5f} ({how}) "
                     f"| {r['diff']:+.5f} | ±{r['noise_band']:.5f} | {'yes' if r['within_noise'] else 'no'} |")
    say("")
    say(f"mean ± sample std over train.seed={','.join(map(str, seeds))}")
    for line in table:
        say(line)
    lines.append(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0
