"""Batched on-device corruptions, composed from the config's list; the clean batch is the target.

    g = make_generator(cfg.train.seed, rank, step, x.device)
    inputs, targets, params = corrupt(x, [{"copies": {"n": 5}}, {"gaussian_noise": {"sigma": 0.2}}], g)

Every op draws one random value (angle, k, permutation) per sample with a few kernels per batch, on
``x``'s device, from ``generator`` (which must live on that device). ``params`` records the draws,
keyed by op, so a logged step can be replayed with the public per-op functions below.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from aedist.registry import Registry


@dataclass(frozen=True)
class Corruption:
    """A registered op: ``apply(x, params, generator) -> (inputs, draws)`` plus its parameter
    schema (name -> (type, default or None when required, lower bound)) and what it does to a
    batch: ``geometric`` (moves pixels: rotation figures apply), ``grows_batch`` (returns k*B
    images; targets are repeated to match), ``fits(params, (C, H, W))`` (None or why the op cannot
    run on such images)."""

    name: str
    apply: Callable[[Tensor, dict[str, Any], torch.Generator | None], tuple[Tensor, dict[str, Any]]]
    params: dict[str, tuple[type, Any, float | None]] = field(default_factory=dict)
    geometric: bool = False
    grows_batch: bool = False
    fits: Callable[[dict[str, Any], tuple[int, ...]], str | None] = lambda p, shape: None


CORRUPTIONS: Registry[Corruption] = Registry("corruption", wrap=Corruption)


def _hint(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def validate_spec(spec: list, image_shape: tuple[int, ...] | None = None) -> list[dict[str, dict[str, Any]]]:
    """Check a corruption list and return it with defaults filled, e.g. ``[{"rot90": {}}]``.

    Each entry is ``{op: {param: value}}`` (or a bare op name). With ``image_shape`` (C, H, W) each
    op also checks that it can run on such images. Raises ``ValueError`` with one line naming the
    entry index, the bad op or parameter and what is allowed.
    """
    if not isinstance(spec, list):
        raise ValueError(f"corruption: expected a list of {{op: {{param: value}}}} entries, got {spec!r}")
    known = list(CORRUPTIONS)
    out: list[dict[str, dict[str, Any]]] = []
    for i, entry in enumerate(spec):
        where = f"corruption[{i}]"
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"{where}: expected one mapping {{op: {{param: value}}}}, got {entry!r} (ops: {', '.join(known)})")
        (op, params), = entry.items()
        if op not in CORRUPTIONS:
            raise ValueError(f"{where}: unknown op {op!r}{_hint(str(op), known)} (known: {', '.join(known)})")
        params = {} if params is None else params
        schema = CORRUPTIONS.get(op).params
        allowed = ", ".join(schema) or "none"
        if not isinstance(params, dict):
            raise ValueError(f"{where}: {op} takes a mapping of parameters ({allowed}), got {params!r}")
        for key in params:
            if key not in schema:
                raise ValueError(f"{where}: {op} has no parameter {key!r}{_hint(str(key), list(schema))} (allowed: {allowed})")
        clean: dict[str, Any] = {}
        for key, (tp, default, low) in schema.items():
            value = params.get(key, default)
            kind = "an integer" if tp is int else "a number"
            bound = f" >= {low:g}" if low is not None else ""
            if value is None:
                raise ValueError(f"{where}: {op} needs {key!r} ({kind}{bound})")
            ok = isinstance(value, int) if tp is int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or (low is not None and value < low) or (tp is float and not math.isfinite(value)):
                raise ValueError(f"{where}: {op}.{key} = {value!r} is not allowed; expected {kind}{bound}")
            clean[key] = tp(value)
        if image_shape is not None and (why := CORRUPTIONS.get(op).fits(clean, tuple(image_shape))):
            raise ValueError(f"{where}: {op} {why}")
        out.append({op: clean})
    return out


def make_generator(seed: int, rank: int, step: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded from a hash of (seed, rank, step).

    Hashing (not ``seed + rank``) keeps neighbouring triples far apart, so ranks draw different
    corruptions at every step and a resumed run redraws exactly what it would have drawn.
    """
    digest = hashlib.blake2b(f"aedist/{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: a non-negative int64
    return generator


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device)


# ----------------------------------------------------------------------------- per-op functions


def _rotated(x: Tensor, angles_deg: Tensor, fill: float) -> Tensor:
    """Sample n rotations of each image: x [B, C, H, W], angles_deg [B, n] -> [B, C, n*H, W] (float).

    The n grids of one image are stacked along the output height, so grid_sample reads each input
    once and ``copies`` needs no repeated input batch.
    """
    b, _, h, w = x.shape
    n = angles_deg.shape[1]
    # Sample in float32: bf16/fp16 grids lose sub-pixel precision, and CPU grid_sample lacks bf16.
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    rad = torch.deg2rad(angles_deg.to(device=x.device, dtype=xf.dtype))
    # Snap float32's cos(pi/2) = -4e-8 to 0 so quarter turns land on pixel centres (torch.rot90).
    cos, sin = [torch.where(v.abs() < 1e-7, 0.0, v).view(b, n, 1, 1) for v in (rad.cos(), rad.sin())]
    # The grid F.affine_grid(align_corners=False) would build for the inverse rotation, written as
    # two broadcast products: 5-9x faster on CPU than affine_grid's bmm with K=3. The aspect
    # factors keep rotation rigid in pixels when H != W (normalized coords scale x and y apart).
    xs = (torch.arange(w, device=x.device, dtype=xf.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=x.device, dtype=xf.dtype) * 2 + 1) / h - 1
    xs, ys = xs.view(1, 1, 1, w), ys.view(1, 1, h, 1)
    grid = torch.empty(b, n, h, w, 2, device=x.device, dtype=xf.dtype)
    grid[..., 0] = cos * xs - sin * (h / w) * ys
    grid[..., 1] = sin * (w / h) * xs + cos * ys
    # Sampling (x - fill) with zero padding, then adding fill back, blends fill into edge pixels by
    # exactly the weight of the outside taps, with no extra mask channel to sample.
    src = xf - fill if fill else xf
    out = F.grid_sample(src, grid.view(b, n * h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.add_(fill) if fill else out


def rotate(x: Tensor, angles_deg: Tensor, fill: float = 0.0) -> Tensor:
    """Rotate each image counter-clockwise by its angle (as torchvision's ``rotate``), bilinear.

    x: [B, C, H, W]; angles_deg: [B] degrees; pixels from outside the image take ``fill``.
    Returns [B, C, H, W] in x's dtype.
    """
    return _rotated(x, angles_deg.view(-1, 1), fill).to(x.dtype)


def _rot90_gather(x: Tensor, k: Tensor) -> Tensor:
    """rot90 as one gather through a per-turn pixel map: no nonzero(), so no host sync on GPUs."""
    b, c, h, w = x.shape
    base = torch.arange(h * w, device=x.device).view(h, w)
    maps = torch.stack([torch.rot90(base, j, (0, 1)).reshape(-1) for j in range(4)])  # [4, H*W]
    return x.reshape(b, c, h * w).gather(2, maps[k].unsqueeze(1).expand(b, c, h * w)).view_as(x)


def rot90(x: Tensor, k: Tensor) -> Tensor:
    """Rotate image i by ``k[i]`` quarter turns, equal to ``torch.rot90(x[i], k[i], (-2, -1))``.

    x: [B, C, H, H] (square); k: [B] integers in 0..3. Returns [B, C, H, H].
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rot90 needs square images, got {x.shape[-2]}x{x.shape[-1]}")
    k = k.to(x.device) % 4
    if x.device.type != "cpu":
        return _rot90_gather(x, k)
    out = torch.empty_like(x)
    # One group per quarter turn: four index_select/rot90/index_copy rounds, whatever the batch
    # size; on CPU 2-4x faster than _rot90_gather (whose index is as large as the batch).
    for j in range(4):
        idx = (k == j).nonzero().squeeze(1)
        out.index_copy_(0, idx, torch.rot90(x.index_select(0, idx), j, (-2, -1)))
    return out


def jigsaw(x: Tensor, perm: Tensor, grid: int) -> Tensor:
    """Shuffle a grid x grid tiling: output patch j (row-major) is input patch ``perm[i, j]``.

    x: [B, C, H, W] with grid dividing H and W; perm: [B, grid*grid]. Returns [B, C, H, W].
    """
    b, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"jigsaw grid {grid} must divide the image size {h}x{w}")
    ph, pw = h // grid, w // grid
    dev = x.device
    # A patch is ph runs of pw contiguous pixels ("segments"), so the whole shuffle is one
    # index_select of segments with a [B*C*H*grid] index: one pass over the pixels, 1-2.5x faster
    # on CPU than gathering patches out of a 5-D view and copying them back.
    r = torch.arange(h, device=dev)
    slot = (r // ph).view(h, 1) * grid + torch.arange(grid, device=dev)  # [H, grid] output patch
    src = perm.to(dev)[:, slot.view(-1)].view(b, 1, h, grid)  # source patch of each segment
    row = (src // grid) * ph + (r % ph).view(1, 1, h, 1)  # source image row
    idx = (torch.arange(b * c, device=dev).view(b, c, 1, 1) * h + row) * grid + src % grid
    segments = rearrange(x, "b c h (g2 pw) -> (b c h g2) pw", pw=pw)
    return rearrange(segments.index_select(0, idx.view(-1)), "(b c h g2) pw -> b c h (g2 pw)", b=b, c=c, h=h)


def jigsaw_inverse(x: Tensor, perm: Tensor, grid: int) -> Tensor:
    """Undo :func:`jigsaw`: ``jigsaw_inverse(jigsaw(x, perm, g), perm, g)`` equals ``x`` exactly.

    x: [B, C, H, W]; perm: [B, grid*grid] as recorded by ``corrupt``. Returns [B, C, H, W].
    """
    return jigsaw(x, perm.argsort(dim=1), grid)


def gaussian_noise(x: Tensor, sigma: float, seed: int) -> Tensor:
    """``clamp(x + N(0, sigma^2), 0, 1)`` with noise drawn from a generator seeded with ``seed``.

    x: [B, C, H, W]. Returns [B, C, H, W] in x's dtype; the same seed on the same device replays it.
    """
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return torch.add(x, noise, alpha=sigma, out=noise).clamp_(0.0, 1.0)


def copies(x: Tensor, angles_deg: Tensor, fill: float = 0.0) -> Tensor:
    """Seed 000's scheme: each image followed (batch-wise) by n rotated copies of itself.

    x: [B, C, H, W]; angles_deg: [n*B], copy j of image i rotated by ``angles_deg[j*B + i]``.
    Returns [(n+1)*B, C, H, W]: the B originals first, then copy 1 of every image, and so on.
    """
    b = x.shape[0]
    n = angles_deg.numel() // b
    out = torch.empty((n + 1) * b, *x.shape[1:], dtype=x.dtype, device=x.device)
    out[:b] = x
    rotated = _rotated(x, angles_deg.view(n, b).t(), fill)  # [B, C, n*H, W]
    out[b:].view(n, b, *x.shape[1:]).copy_(rearrange(rotated, "b c (n h) w -> n b c h w", n=n))
    return out


def spec_is_geometric(spec: list) -> bool:
    """Whether any op of ``spec`` moves pixels (rotations, turns, shuffles)."""
    return any(CORRUPTIONS.get(op).geometric for entry in validate_spec(spec) for op in entry)


# ----------------------------------------------------------------------------- the registry


def _divides(p: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    h, w = shape[-2:]
    return None if h % p["grid"] == 0 and w % p["grid"] == 0 else f"grid {p['grid']} must divide the image size {h}x{w}"


def _square(p: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    return None if shape[-1] == shape[-2] else f"needs square images, got {shape[-2]}x{shape[-1]}"


@CORRUPTIONS.register("rotate", params={"max_degrees": (float, 180.0, 0.0), "fill": (float, 0.0, None)}, geometric=True)
def _apply_rotate(x: Tensor, p: dict[str, Any], generator: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
    angles = (_uniform(x.shape[0], generator, x.device) * 2 - 1) * p["max_degrees"]
    return rotate(x, angles, p["fill"]), {"angles": angles}


@CORRUPTIONS.register("rot90", geometric=True, fits=_square)
def _apply_rot90(x: Tensor, p: dict[str, Any], generator: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
    k = torch.randint(0, 4, (x.shape[0],), generator=generator, device=x.device)
    return rot90(x, k), {"k": k}


@CORRUPTIONS.register("jigsaw", params={"grid": (int, 4, 1)}, geometric=True, fits=_divides)  # 4x4 patches of 7 px on 28x28
def _apply_jigsaw(x: Tensor, p: dict[str, Any], generator: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
    # argsort of uniform keys: an unbiased random permutation per row, all rows at once.
    perm = _uniform(x.shape[0] * p["grid"] ** 2, generator, x.device).view(x.shape[0], -1).argsort(dim=1)
    return jigsaw(x, perm, p["grid"]), {"perm": perm, "grid": p["grid"]}


@CORRUPTIONS.register("gaussian_noise", params={"sigma": (float, None, 0.0)})
def _apply_noise(x: Tensor, p: dict[str, Any], generator: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
    # A fresh seed drawn from the run's generator makes the noise replayable from one int.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=x.device).item())
    return gaussian_noise(x, p["sigma"], seed), {"sigma": p["sigma"], "seed": seed}


@CORRUPTIONS.register("copies", params={"n": (int, None, 1), "max_degrees": (float, 180.0, 0.0), "fill": (float, 0.0, None)},
                      geometric=True, grows_batch=True)
def _apply_copies(x: Tensor, p: dict[str, Any], generator: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
    angles = (_uniform(p["n"] * x.shape[0], generator, x.device) * 2 - 1) * p["max_degrees"]
    return copies(x, angles, p["fill"]), {"n": p["n"], "angles": angles}


# ----------------------------------------------------------------------------- composition


def corrupt(x: Tensor, spec: list[dict], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Apply the ops of ``spec`` in order to the batch ``x``; return (inputs, targets, params).

    x: [B, C, H, W] floats in [0, 1] (float32, bf16, ...) on any device. ``generator`` lives on
    x's device (see :func:`make_generator`); None uses torch's default generator. inputs: [B', C,
    H, W] where B' = B * prod(n + 1) over ``copies`` ops, else B; targets: the clean images, the
    originals repeated to match (so ``targets is x`` when no op grows the batch). params: the draws
    per op key (the op name, ``op#i`` for repeats): ``angles`` [B'] (degrees), ``k`` [B'],
    ``perm`` [B', grid*grid], ``seed`` (int) — device tensors, no host sync except the noise seed.
    """
    spec = validate_spec(spec)
    if spec and not x.is_floating_point():
        raise TypeError(f"corrupt needs float images in [0, 1], got {x.dtype}; convert with x.float() / 255")
    inputs, targets, params = x, x, {}
    for i, entry in enumerate(spec):
        (op, p), = entry.items()
        b = inputs.shape[0]
        key = op if op not in params else f"{op}#{i}"
        inputs, params[key] = CORRUPTIONS.get(op).apply(inputs, p, generator)
        if inputs.shape[0] != b:  # a batch-growing op: every input keeps its clean original as target
            targets = targets.repeat(inputs.shape[0] // b, 1, 1, 1)
    return inputs, targets, params
