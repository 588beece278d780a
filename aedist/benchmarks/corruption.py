"""Batched ``corrupt`` against per-sample torchvision v2 transforms: ``python launch/benchmark.py corruption``.

For every op and two batch shapes (256x1x28x28, 64x3x96x96) it times the batched on-device op and
the per-sample loop a torchvision Dataset would run (one transform call per image, then a stack),
on CPU and, where CUDA is present, on the GPU. img/s counts input images (before ``copies``).
Run it on an idle machine: the batched ops use all intra-op threads, and a busy core stalls them
far more than the single-threaded per-sample loop, so ratios under load understate the gain.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from aedist.benchmarks import Row, median_rate, row
from aedist.data.corruption import corrupt, make_generator

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


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    """Rows of img/s per (device, op, shape, batched|per-sample) and the batched/per-sample ratios."""
    torch.manual_seed(0)
    repeats = getattr(args, "repeats", 5)
    rows, ratios = _measure(torch.device("cpu"), repeats)
    if torch.cuda.is_available():
        more_rows, more_ratios = _measure(torch.device("cuda"), repeats)
        rows += more_rows
        ratios.update(more_ratios)
    return rows, ratios
