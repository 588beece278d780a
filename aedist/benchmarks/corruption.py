"""Corruption suite: ``python launch/benchmark.py corruption [--json FILE]``.

Two parts, on CPU and, where CUDA is present, on the GPU:

1. Batched ``corrupt`` against per-sample torchvision v2 transforms: for every op and two batch
   shapes (256x1x28x28, 64x3x96x96) the batched on-device op and the per-sample loop a torchvision
   Dataset would run (one transform call per image, then a stack). img/s counts input images
   (before ``copies``).
2. The corruption's share of a training step, for every config in ``configs/seeds/``: the engine's
   step body (``prepare_batch`` with the config's corruption, forward under the precision and
   memory format ``auto`` resolves to on this device, loss, backward, optimizer step) timed
   interleaved with ``corrupt`` alone on the same batch; the ratio is corruption time / step time
   in percent. A config without a training corruption spends 0% there (listed, not timed).

Run it on an idle machine: the batched ops use all intra-op threads, and a busy core stalls them
far more than the single-threaded per-sample loop, so ratios under load understate the gain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from aedist import precision
from aedist.batch import prepare_batch
from aedist.benchmarks import Row, median_rate, row
from aedist.config import Config, load_config
from aedist.data.corruption import corrupt, make_generator
from aedist.losses import compute_loss
from aedist.models import build_model
from aedist.optim import build_optimizer

SEED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "seeds"
NOT_CONFIGS = {"claims.yaml"}  # the report's claims about the seed runs, not a training config
SHARE_WARMUP, SHARE_STEPS = 3, 30  # steps per config: warm-up (allocator, oneDNN primitives), then timed

SHAPES = [(256, 1, 28, 28), (64, 3, 96, 96)]
SIGMA, COPIES, GRID = 0.2, 5, 4


def _jigsaw_one(img: Tensor, grid: int = GRID) -> Tensor:
    """Per-sample jigsaw with plain torch ops: [C, H, W] -> [C, H, W]."""
    c, h, w = img.shape
    ph, pw = h // grid, w // grid
    tiles = img.unfold(1, ph, ph).unfold(2, pw, pw).reshape(c, grid * grid, ph, pw)
    tiles = tiles[:, torch.randperm(grid * grid, device=img.device)]
    return tiles.reshape(c, grid, grid, ph, pw).permute(0, 1, 3, 2, 4).reshape(c, h, w)


def _per_sample_ops() -> dict[str, Callable[[Tensor], Tensor]]:
    """One torchvision v2 transform per op, applied to a single [C, H, W] image."""
    rotation = v2.RandomRotation(180, interpolation=InterpolationMode.BILINEAR)

    def copies(img: Tensor) -> Tensor:
        return torch.stack([img] + [rotation(img) for _ in range(COPIES)])

    return {
        "rotate": rotation,
        "rot90": v2.Lambda(lambda img: torch.rot90(img, int(torch.randint(4, ())), (-2, -1))),
        "jigsaw": v2.Lambda(_jigsaw_one),
        "gaussian_noise": v2.GaussianNoise(sigma=SIGMA, clip=True),
        "copies": v2.Lambda(copies),
    }


SPECS = {
    "rotate": [{"rotate": {"max_degrees": 180}}],
    "rot90": [{"rot90": {}}],
    "jigsaw": [{"jigsaw": {"grid": GRID}}],
    "gaussian_noise": [{"gaussian_noise": {"sigma": SIGMA}}],
    "copies": [{"copies": {"n": COPIES, "max_degrees": 180}}],
}


def _measure(device: torch.device, repeats: int) -> tuple[list[Row], dict[str, float]]:
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    per_sample = _per_sample_ops()
    for shape in SHAPES:
        x = torch.rand(shape, device=device)
        tag = "x".join(map(str, shape))
        for op, spec in SPECS.items():
            step = iter(range(10**9))

            def batched(spec: list = spec) -> int:
                # A fresh generator per call, as the engine makes one per step.
                corrupt(x, spec, make_generator(0, 0, next(step), device))
                return len(x)

            def looped(fn: Callable[[Tensor], Tensor] = per_sample[op]) -> int:
                torch.stack([fn(img) for img in x])
                return len(x)

            fast = median_rate(batched, repeats=repeats, sync=sync)
            slow = median_rate(looped, repeats=repeats, sync=sync)
            rows.append(row("corruption", f"{device.type} {op} {tag} batched", fast))
            rows.append(row("corruption", f"{device.type} {op} {tag} per-sample", slow))
            ratios[f"{device.type} {op} {tag} batched/per-sample"] = fast / slow
    return rows, ratios


def _step_and_corruption(cfg: Config, device: torch.device, steps: int) -> tuple[dict[str, list[float]], dict[str, list[float]], str]:
    """Seconds of each timed training step (corruption included) and of the corruption alone,
    interleaved step by step so load drift hits both alike, as wall time (``wall``) and as this
    process's CPU time (``cpu``: all its threads; on a shared machine it leaves out the time the
    process waited for a core, which wall time counts); plus the resolved settings."""
    mp = precision.resolve_mixed_precision(cfg.train.mixed_precision, device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    cl = precision.resolve_channels_last(cfg.train.channels_last, model, device, mp)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.optim, on_cuda=device.type == "cuda")
    b, c, s = cfg.data.batch_size, cfg.model.in_channels, cfg.model.image_size
    images = torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, device=device)
    dtype = torch.float16 if mp == "fp16" else torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i: int) -> None:
        batch = prepare_batch(images, cfg.corruption, make_generator(0, 0, i, device), normalize=cfg.data.normalize, channels_last=cl)
        with torch.autocast(device.type, dtype=dtype, enabled=mp != "no"):
            out = model(batch.inputs)
        compute_loss(out, batch.targets, cfg.loss)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def corruption(i: int) -> None:
        corrupt(images.float() / 255.0, cfg.corruption, make_generator(0, 0, i, device))

    step_s: dict[str, list[float]] = {"wall": [], "cpu": []}
    corr_s: dict[str, list[float]] = {"wall": [], "cpu": []}
    for i in range(SHARE_WARMUP + steps):
        for fn, out in ((step, step_s), (corruption, corr_s)):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(i)
            sync()
            if i >= SHARE_WARMUP:
                out["wall"].append(time.perf_counter() - t0)
                out["cpu"].append(time.process_time() - c0)
    how = f"{'fp32' if mp == 'no' else mp}{' + channels_last' if cl else ''}"
    return step_s, corr_s, how


def _measure_shares(device: torch.device, steps: int) -> tuple[list[Row], dict[str, float]]:
    """Per seed config: step and corruption img/s rows, and the corruption's % of the step."""
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    for path in sorted(SEED_CONFIGS.glob("*.yaml")):
        if path.name in NOT_CONFIGS:
            continue
        cfg = load_config(path)
        name = path.stem
        if not cfg.corruption:
            ratios[f"{device.type} {name} corruption % of step (no training corruption)"] = 0.0
            continue
        ops = "+".join(op for entry in cfg.corruption for op in entry)
        step_s, corr_s, how = _step_and_corruption(cfg, device, steps)
        b = cfg.data.batch_size
        rows.append(row("corruption", f"{device.type} {name} step, batch {b}, {how} (median)", b / statistics.median(step_s["wall"])))
        rows.append(row("corruption", f"{device.type} {name} {ops} alone (median)", b / statistics.median(corr_s["wall"])))
        # Wall medians carry the machine's load; wall minimums estimate each one's cost undisturbed
        # (a busy core stalls a 2-thread op far more than a long step, so the two can disagree);
        # CPU-time medians count only the cycles this process spent.
        ratios[f"{device.type} {name} corruption % of step ({ops}), wall medians"] = 100 * statistics.median(corr_s["wall"]) / statistics.median(step_s["wall"])
        ratios[f"{device.type} {name} corruption % of step ({ops}), wall minimums"] = 100 * min(corr_s["wall"]) / min(step_s["wall"])
        ratios[f"{device.type} {name} corruption % of step ({ops}), CPU-time medians"] = 100 * statistics.median(corr_s["cpu"]) / statistics.median(step_s["cpu"])
    return rows, ratios


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    """Rows of img/s per (device, op, shape, batched|per-sample) and per seed config's step and
    corruption; ratios batched/per-sample and the corruption's % of each config's step."""
    torch.manual_seed(0)
    repeats = getattr(args, "repeats", 5)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    for device in devices:
        more_rows, more_ratios = _measure(device, repeats)
        rows += more_rows
        ratios.update(more_ratios)
    for device in devices:
        more_rows, more_ratios = _measure_shares(device, SHARE_STEPS)
        rows += more_rows
        ratios.update(more_ratios)
    return rows, ratios
