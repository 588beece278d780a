"""Figures on tiny inputs: image arrays of the right kind, grid pixels equal to torchvision's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from aedist import visuals


def _is_image(a: np.ndarray, min_side: int = 40) -> None:
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert min(a.shape[:2]) >= min_side
    assert a.std() > 0  # something was drawn


def test_bare_recon_grid_equals_torchvision_make_grid() -> None:
    g = torch.Generator().manual_seed(0)
    clean, noisy, out = (torch.rand(5, 1, 6, 6, generator=g) for _ in range(3))
    got = visuals.recon_grid(clean, noisy, out, annotate=False)
    ref = make_grid(torch.cat([clean, noisy, out]), nrow=5, padding=2, pad_value=1.0)
    ref_u8 = ref.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, ref_u8)
    # Row 2 (corrupted), column 3 holds exactly that image.
    cell = got[2 + 1 * 8: 2 + 1 * 8 + 6, 2 + 3 * 8: 2 + 3 * 8 + 6, 0]
    np.testing.assert_array_equal(cell, (noisy[3, 0] * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("channels", [1, 3])
def test_annotated_recon_grid(channels: int) -> None:
    x = torch.rand(4, channels, 8, 8)
    _is_image(visuals.recon_grid(x, x.flip(-1), x * 0.5, captions=["a", "b", "c", "d"], title="t"))
    _is_image(visuals.recon_grid(x, None, x))


@pytest.mark.parametrize("dims_in, method, dims", [(2, "auto", 2), (8, "pca", 2), (8, "pca", 3), (8, "tsne", 2), (8, "tsne", 3)])
def test_latent_scatter(dims_in: int, method: str, dims: int) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 45)
    z = rng.normal(size=(45, dims_in)) + labels[:, None] * 3.0
    _is_image(visuals.latent_scatter(z, labels, ["a", "b", "c"], method=method, dims=dims))


def test_rotation_panel_interpolation_prior_and_plane() -> None:
    k, a = 2, 4
    rotated, decoded = torch.rand(k, a, 1, 8, 8), torch.rand(k, a, 1, 8, 8)
    _is_image(visuals.rotation_panel(rotated, decoded, torch.randn(k, a, 2), ["x", "y"], [0, 90, 180, 270]))
    _is_image(visuals.rotation_panel(rotated, decoded, torch.randn(k, a, 5), ["x", "y"], [0, 90, 180, 270]))
    _is_image(visuals.interpolation_strip(torch.rand(10, 3, 8, 8)))
    _is_image(visuals.prior_samples(torch.rand(16, 1, 8, 8)))
    plane = visuals.latent_plane(grid=4, extent=2.0)
    assert plane.shape == (16, 2) and plane[0].tolist() == [-2.0, 2.0] and plane[-1].tolist() == [2.0, -2.0]
    _is_image(visuals.latent_grid(torch.rand(16, 1, 8, 8), extent=2.0))
    with pytest.raises(ValueError):
        visuals.latent_grid(torch.rand(15, 1, 8, 8))


def test_interpolate_latents_is_linear_with_exact_endpoints() -> None:
    z0, z1 = torch.tensor([0.1, -2.0, 3.3]), torch.tensor([1.7, 0.4, -0.9])
    path = visuals.interpolate_latents(z0, z1, steps=8)
    assert path.shape == (10, 3)
    assert torch.equal(path[0], z0) and torch.equal(path[-1], z1)
    steps = path[1:] - path[:-1]
    assert torch.allclose(steps, steps[0].expand_as(steps), atol=1e-6)


def test_loss_curves_and_png_round_trip(tmp_path: Path) -> None:
    curves = {run: {"train/loss": [(e, 1 / (e + i + 1)) for e in range(5)], "val/loss": [(e, 1.1 / (e + 1)) for e in range(5)]}
              for i, run in enumerate(["plain", "dropout"])}
    arr = visuals.loss_curves(curves, "loss")
    _is_image(arr)
    path = visuals.save_png(arr, tmp_path / "sub" / "curves.png")
    with Image.open(path) as im:
        assert im.size == (arr.shape[1], arr.shape[0])
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), arr)


def test_rotation_panel_with_per_image_angles_and_bad_dims() -> None:
    k, a = 3, 5
    angles = torch.rand(k, a) * 360  # random rotations, one angle per image (seed 000 figs 4-5)
    _is_image(visuals.rotation_panel(torch.rand(k, a, 1, 8, 8), torch.rand(k, a, 1, 8, 8), torch.randn(k, a, 2), ["x", "y", "z"], angles))
    _is_image(visuals.interpolation_strip(torch.rand(2, 10, 1, 8, 8), row_labels=["a->b", "c->d"]))
    with pytest.raises(ValueError):
        visuals.latent_scatter(np.zeros((10, 2)), np.zeros(10), dims=3)


@pytest.mark.parametrize("z", [np.zeros((40, 8), np.float32), np.full((40, 8), np.nan, np.float32)])
def test_tsne_of_collapsed_or_non_finite_latents_draws_instead_of_crashing(z: np.ndarray) -> None:
    # scikit-learn's Barnes-Hut t-SNE segfaults on identical points (a ReLU latent that died: seen on the
    # MLP AE with random pixels); the scatter must still be drawn, with its axes saying why it is empty.
    img = visuals.latent_scatter(z, np.arange(40) % 4, method="tsne")
    assert img.ndim == 3 and img.shape[2] == 3
