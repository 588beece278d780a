"""Batched corruptions against independent references (torch.rot90, torchvision, unfold)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from aedist.data.corruption import (
    CORRUPTIONS,
    _rot90_gather,
    corrupt,
    gaussian_noise,
    jigsaw,
    jigsaw_inverse,
    make_generator,
    rot90,
    rotate,
    validate_spec,
)

# Every registered op on its own (required parameters at a small legal value), then a chain of all.
ALL_OPS = [[{name: {k: (2 if tp is int else 0.2) for k, (tp, default, _) in op.params.items() if default is None}}]
           for name, op in CORRUPTIONS.items()]
ALL_OPS.append([{"copies": {"n": 1, "max_degrees": 45}}, {"rot90": {}}, {"jigsaw": {"grid": 2}}, {"gaussian_noise": {"sigma": 0.1}}])
assert len(ALL_OPS) >= 6
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(b: int = 8, c: int = 1, h: int = 28, w: int | None = None, seed: int = 0) -> torch.Tensor:
    """Random images: no symmetry, so any wrong direction or transposition shows."""
    return torch.rand(b, c, h, w or h, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0, rank: int = 0, step: int = 0, device: str = "cpu") -> torch.Generator:
    return make_generator(seed, rank, step, device)


# ----------------------------------------------------------------------------- rotations


def test_rot90_op_equals_torch_rot90_per_sample() -> None:
    x = images(32)
    inputs, targets, params = corrupt(x, [{"rot90": {}}], gen())
    k = params["rot90"]["k"]
    assert set(k.tolist()) == {0, 1, 2, 3}  # 32 draws: all four turns occur
    for i in range(len(x)):
        assert torch.equal(inputs[i], torch.rot90(x[i], int(k[i]), (-2, -1)))
    assert targets is x


def test_rot90_gather_path_equals_grouped_path() -> None:
    """The accelerator path (one gather, no host sync) gives the CPU path's result."""
    x = images(16, c=3, h=9)
    k = torch.arange(16) % 4
    assert torch.equal(_rot90_gather(x, k), rot90(x, k))


def test_rot90_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        rot90(images(2, h=28, w=30), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("size", [28, 5, 96])
def test_rotate_quarter_turns_equal_rot90(size: int) -> None:
    x = images(5, c=3, h=size)
    angles = torch.tensor([90.0, -90.0, 180.0, -180.0, 270.0])
    turns = [1, 3, 2, 2, 3]
    out = rotate(x, angles)
    for i, k in enumerate(turns):
        torch.testing.assert_close(out[i], torch.rot90(x[i], k, (-2, -1)), atol=1e-5, rtol=0)


def test_rotate_op_uses_recorded_angles_and_zero_is_identity() -> None:
    x = images(16)
    inputs, _, params = corrupt(x, [{"rotate": {"max_degrees": 30, "fill": 0.25}}], gen())
    angles = params["rotate"]["angles"]
    assert angles.shape == (16,) and angles.abs().max() <= 30 and angles.std() > 1
    torch.testing.assert_close(inputs, rotate(x, angles, 0.25))
    still, _, _ = corrupt(x, [{"rotate": {"max_degrees": 0}}], gen())
    torch.testing.assert_close(still, x, atol=3e-6, rtol=0)


@pytest.mark.parametrize("shape", [(28, 28), (20, 32)])
def test_rotate_matches_torchvision_in_interior(shape: tuple[int, int]) -> None:
    h, w = shape
    x = images(4, c=2, h=h, w=w)
    angles = torch.tensor([17.0, -33.0, 123.4, -171.0])
    out = rotate(x, angles)
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    inside = (yy**2 + xx**2).sqrt() < min(h, w) / 2 - 2  # away from the corners that leave the frame
    for i, a in enumerate(angles.tolist()):
        ref = TF.rotate(x[i], a, interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(out[i][:, inside], ref[:, inside], atol=1e-4, rtol=0)
        wrong = TF.rotate(x[i], -a, interpolation=InterpolationMode.BILINEAR)
        assert (out[i][:, inside] - wrong[:, inside]).abs().mean() > 0.05  # the direction matters


def test_rotate_grid_equals_affine_grid() -> None:
    """The broadcast grid is the one F.affine_grid builds (non-square: aspect-corrected theta)."""
    b, c, h, w = 3, 2, 12, 20
    x = images(b, c, h, w)
    angles = torch.tensor([10.0, -75.0, 200.0])
    r = torch.deg2rad(angles)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = r.cos(), -r.sin() * h / w
    theta[:, 1, 0], theta[:, 1, 1] = r.sin() * w / h, r.cos()
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(rotate(x, angles), ref, atol=1e-5, rtol=0)


def test_rotate_fill_outside() -> None:
    x = torch.zeros(1, 1, 16, 16)
    out = rotate(x, torch.tensor([45.0]), fill=1.0)
    assert out[0, 0, 0, 0] == pytest.approx(1.0) and out[0, 0, 8, 8] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- jigsaw


@pytest.mark.parametrize(("shape", "g"), [((28, 28), 4), ((12, 20), 4), ((96, 96), 8)])
def test_jigsaw_is_recorded_patch_permutation_and_inverse_restores(shape: tuple[int, int], g: int) -> None:
    (h, w), b = shape, 6
    ph, pw = h // g, w // g
    x = images(b, c=2, h=h, w=w)
    inputs, targets, params = corrupt(x, [{"jigsaw": {"grid": g}}], gen())
    perm = params["jigsaw"]["perm"]
    assert perm.shape == (b, g * g) and params["jigsaw"]["grid"] == g
    assert torch.equal(perm.sort(dim=1).values, torch.arange(g * g).expand(b, -1))
    # Independent patch view via unfold: [B, C, g, g, ph, pw] -> [B, g*g, C, ph, pw].
    def tiles(t: torch.Tensor) -> torch.Tensor:
        return t.unfold(2, ph, ph).unfold(3, pw, pw).permute(0, 2, 3, 1, 4, 5).reshape(b, g * g, -1, ph, pw)

    src, dst = tiles(x), tiles(inputs)
    for i in range(b):
        for j in range(g * g):
            assert torch.equal(dst[i, j], src[i, perm[i, j]])
    assert not torch.equal(inputs, x)
    assert torch.equal(jigsaw_inverse(inputs, perm, g), x)
    assert targets is x


def test_jigsaw_rejects_grid_not_dividing() -> None:
    with pytest.raises(ValueError, match="divide"):
        jigsaw(images(2), torch.arange(25).expand(2, -1), 5)


# ----------------------------------------------------------------------------- noise


def test_gaussian_noise_sigma_and_range() -> None:
    x = torch.full((64, 1, 28, 28), 0.5)
    sigma = 0.1  # 5 sigma from both bounds: clamping is negligible
    inputs, targets, params = corrupt(x, [{"gaussian_noise": {"sigma": sigma}}], gen())
    d = inputs - x
    assert abs(d.mean().item()) < 2e-3
    assert d.std().item() == pytest.approx(sigma, rel=0.02)
    torch.testing.assert_close(inputs, gaussian_noise(x, sigma, params["gaussian_noise"]["seed"]), atol=0, rtol=0)
    loud, _, _ = corrupt(images(8), [{"gaussian_noise": {"sigma": 0.5}}], gen())
    assert loud.min() >= 0 and loud.max() <= 1
    assert targets is x


# ----------------------------------------------------------------------------- copies


def test_copies_grow_batch_originals_first() -> None:
    n, b = 3, 4
    x = images(b)
    inputs, targets, params = corrupt(x, [{"copies": {"n": n, "max_degrees": 90}}], gen())
    assert inputs.shape == ((n + 1) * b, 1, 28, 28) and targets.shape == inputs.shape
    assert torch.equal(inputs[:b], x)
    assert torch.equal(targets, torch.cat([x] * (n + 1)))
    angles = params["copies"]["angles"]
    assert angles.shape == (n * b,) and angles.abs().max() <= 90
    for j in range(n):
        for i in range(b):
            ref = rotate(x[i : i + 1], angles[j * b + i : j * b + i + 1])
            torch.testing.assert_close(inputs[b + j * b + i], ref[0])


def test_compose_after_copies_draws_for_grown_batch() -> None:
    x = images(4)
    inputs, targets, params = corrupt(x, [{"copies": {"n": 2}}, {"rot90": {}}, {"rot90": {}}], gen())
    assert inputs.shape[0] == 12 and torch.equal(targets, torch.cat([x] * 3))
    assert params["rot90"]["k"].shape == (12,) and params["rot90#2"]["k"].shape == (12,)


# ----------------------------------------------------------------------------- all ops


@pytest.mark.parametrize("spec", ALL_OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_targets_clean_and_same_generator_same_draws(spec: list, device: str) -> None:
    x = images(8).to(device)
    keep = x.clone()
    a, ta, pa = corrupt(x, spec, gen(3, 1, 7, device))
    b, tb, pb = corrupt(x, spec, gen(3, 1, 7, device))
    assert torch.equal(x, keep)  # nothing in place
    reps = math.prod(e["copies"]["n"] + 1 for e in spec if "copies" in e)
    assert torch.equal(ta, torch.cat([x] * reps)) and torch.equal(a, b) and torch.equal(ta, tb)
    assert pa.keys() == pb.keys()
    assert a.device == x.device and a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("spec", ALL_OPS)
def test_different_seed_rank_step_draw_differently(spec: list) -> None:
    x = images(8)
    outs = [corrupt(x, spec, gen(*t))[0] for t in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]]
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.equal(outs[i], outs[j])


def test_make_generator_seeds() -> None:
    seeds = {make_generator(s, r, t, "cpu").initial_seed() for s in range(4) for r in range(4) for t in range(4)}
    assert len(seeds) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert make_generator(5, 2, 9, "cpu").initial_seed() == make_generator(5, 2, 9, "cpu").initial_seed()


@pytest.mark.parametrize("spec", ALL_OPS)
def test_bfloat16_matches_float32(spec: list) -> None:
    x = images(8)
    out32, _, p32 = corrupt(x, spec, gen())
    out16, t16, p16 = corrupt(x.bfloat16(), spec, gen())
    assert out16.dtype == torch.bfloat16 and t16.dtype == torch.bfloat16 and out16.shape == out32.shape
    assert out16.min() >= 0 and out16.max() <= 1
    if not any("gaussian_noise" in e for e in spec):  # noise is drawn in bf16: another stream
        torch.testing.assert_close(out16.float(), out32, atol=2e-2, rtol=0)


def test_integer_images_rejected() -> None:
    with pytest.raises(TypeError, match="float"):
        corrupt(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [{"rot90": {}}], gen())


def test_empty_spec_is_identity() -> None:
    x = images(2)
    inputs, targets, params = corrupt(x, [], gen())
    assert inputs is x and targets is x and params == {}


# ----------------------------------------------------------------------------- validation


def test_validate_fills_defaults() -> None:
    assert validate_spec([{"rotate": {"max_degrees": 90}}, "rot90", {"jigsaw": None}, {"copies": {"n": 5}}]) == [
        {"rotate": {"max_degrees": 90.0, "fill": 0.0}},
        {"rot90": {}},
        {"jigsaw": {"grid": 4}},
        {"copies": {"n": 5, "max_degrees": 180.0, "fill": 0.0}},
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([{"rotat": {}}], "corruption[0]: unknown op 'rotat'; did you mean 'rotate'? (known: copies, gaussian_noise, jigsaw, rot90, rotate)"),
        ([{"rot90": {}}, {"rotate": {"max_degree": 90}}], "corruption[1]: rotate has no parameter 'max_degree'; did you mean 'max_degrees'?"),
        ([{"gaussian_noise": {}}], "corruption[0]: gaussian_noise needs 'sigma'"),
        ([{"gaussian_noise": {"sigma": -1}}], "corruption[0]: gaussian_noise.sigma = -1 is not allowed; expected a number >= 0"),
        ([{"jigsaw": {"grid": 2.5}}], "jigsaw.grid = 2.5 is not allowed; expected an integer >= 1"),
        ([{"copies": {"n": True}}], "copies.n = True is not allowed"),
        ([{"rotate": {}, "rot90": {}}], "corruption[0]: expected one mapping"),
        ([{"rotate": 90}], "corruption[0]: rotate takes a mapping of parameters (max_degrees, fill)"),
        ({"rotate": {}}, "corruption: expected a list"),
        ([{"rotate": {"fill": float("nan")}}], "rotate.fill = nan is not allowed"),
    ],
)
def test_validate_errors_one_line(spec: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_spec(spec)  # type: ignore[arg-type]
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        corrupt(images(1), spec, gen())  # type: ignore[arg-type]


def test_keep_rows_go_in_clean_and_the_rest_exactly_as_corrupted() -> None:
    """data.repeat_clean: the originals of an expanded dataset skip the corruption; the other rows get
    the same draws they would get without the mask."""
    from aedist.batch import prepare_batch
    from aedist.data.corruption import make_generator

    images = torch.randint(0, 256, (8, 1, 12, 12), dtype=torch.uint8)
    spec = [{"rotate": {"max_degrees": 180}}]
    keep = torch.tensor([True, False, False, True, False, False, False, True])
    plain = prepare_batch(images, spec, make_generator(0, 0, 5, images.device))
    masked = prepare_batch(images, spec, make_generator(0, 0, 5, images.device), keep=keep)
    clean = images.float() / 255
    assert torch.equal(masked.inputs[keep], clean[keep]) and torch.equal(masked.inputs[~keep], plain.inputs[~keep])
    assert not torch.equal(plain.inputs[keep], clean[keep])  # without the mask those rows would have been rotated
    assert torch.equal(masked.targets, clean)
