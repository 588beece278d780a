"""Spatial latents [B, C, h, w] through every consumer of a latent: the KL loss, the Gaussianity metric,
the eval pass and kNN, and the figures (scatter, interpolation, prior samples, error maps, EMA recons).

A tiny KL model with mu/logvar [B, 2, 7, 7] from 28x28 images stands in for diffusers' AutoencoderKL;
it is registered for the tests of this file only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from matplotlib import colormaps
from torch import nn

from aedist import metrics, visuals
from aedist.config import Config, LossConfig, ModelConfig, load_config
from aedist.losses import compute_loss, kl_divergence
from aedist.models import MODELS, AEOutput, build_model, register_model

SPATIAL = "tiny_spatial_kl"
SHAPE = (2, 7, 7)


class TinySpatialKL(nn.Module):
    """x [B, C, 28, 28] -> mu, logvar [B, 2, 7, 7] -> x_hat [B, C, 28, 28]; no ``latent_dim`` on purpose,
    so nothing here can lean on a flat size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.latent_shape: tuple[int, ...] = SHAPE
        self.encoder = nn.Sequential(nn.Conv2d(channels, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 2 * SHAPE[0], 3, 2, 1))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(SHAPE[0], 8, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(8, channels, 4, 2, 1), nn.Sigmoid())
        self.decoded_shapes: list[tuple[int, ...]] = []  # every decode's input shape, for the tests to read

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.decoded_shapes.append(tuple(z.shape))
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> AEOutput:
        mu, logvar = self.posterior(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return AEOutput(self.decode(z), z, mu, logvar)


@pytest.fixture(scope="module", autouse=True)
def spatial_model_registered() -> Iterator[None]:
    register_model(SPATIAL)(lambda cfg: TinySpatialKL(cfg.in_channels))
    yield
    # The registry has no public removal; other test files assert its exact contents.
    MODELS._entries.pop(SPATIAL)


def _cfg(tiny_shards: Path, tmp_path: Path, *extra: str) -> Config:
    return load_config(None, [f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "run.name=spatial", "log.wandb=disabled",
                              "train.cpu=true", "train.compile=false", "train.mixed_precision=no", "log.probe_size=16",
                              "eval.knn_train=64", f"model.name={SPATIAL}", *extra])


@pytest.mark.parametrize("name, latent_dim, shape", [("conv_ae", 5, (5,)), ("conv_ae", 0, (32 * 7 * 7,)), ("mlp_ae", 5, (5,)),
                                                     ("conv_vae", 3, (3,)), ("mlp_vae", 3, (3,)), (SPATIAL, 2, SHAPE)])
def test_every_model_declares_latent_shape_and_honours_it(name: str, latent_dim: int, shape: tuple[int, ...]) -> None:
    """encode returns [B, *latent_shape] and decode takes it back to images, for flat and spatial models alike."""
    model = build_model(ModelConfig(name=name, image_size=28, latent_dim=latent_dim, channels=[16, 32], hidden=[32])).eval()
    x = torch.rand(3, 1, 28, 28)
    assert model.latent_shape == shape
    z = model.encode(x)
    assert z.shape == (3, *shape)
    assert model.decode(z).shape == x.shape
    out = model(x)
    assert out.z.shape == (3, *shape) and (out.mu is None or out.mu.shape == (3, *shape))


def test_kl_divergence_sums_every_latent_element() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, *SHAPE, generator=g), torch.randn(4, *SHAPE, generator=g)
    got = kl_divergence(mu, logvar)
    # Same as the flat computation on the flattened tensors, and as torch's per-element Normal KL summed.
    assert torch.allclose(got, kl_divergence(rearrange(mu, "b c h w -> b (c h w)"), rearrange(logvar, "b c h w -> b (c h w)")))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(got, ref.sum(dim=(1, 2, 3)).mean(), rtol=1e-5)
    # By hand: mu = 1, sigma = 1 in all 2*7*7 elements -> 0.5 * 1 per element -> 49 per image.
    assert kl_divergence(torch.ones(3, *SHAPE), torch.zeros(3, *SHAPE)).item() == pytest.approx(49.0)
    # The loss term stays per pixel: divided by C*H*W of one target image.
    target = torch.rand(4, 1, 28, 28)
    terms = compute_loss(AEOutput(target, mu, mu, logvar), target, LossConfig(beta=1.0))
    assert terms["kl"].item() == pytest.approx(got.item() / 784, rel=1e-6)


def test_gaussianity_of_spatial_latents_pools_positions_per_channel() -> None:
    """Channel 0 ~ N(0, 1), channel 1 ~ N(3, 2^2) at every position: the fitted per-channel Gaussian
    has KL 0 + 0.5 (4 + 9 - 1 - ln 4); positions are samples, so the result is that of a 2-D latent."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 2, 4, 4, generator=g)
    z[:, 1] = 3.0 + 2.0 * z[:, 1]
    got = metrics.latent_gaussianity(z)
    assert got["kl"] == pytest.approx(0.5 * (4 + 9 - 1 - np.log(4)), rel=0.03)
    assert got["mean_norm"] == pytest.approx(3.0, rel=0.03) and got["std_dev"] == pytest.approx(0.5, rel=0.05)
    # Exactly the statistics of the (image, position) samples, computed here with numpy.
    samples = np.moveaxis(z.double().numpy(), 1, -1).reshape(-1, 2)
    mu, var = samples.mean(axis=0), samples.var(axis=0, ddof=1)
    assert got["kl"] == pytest.approx(0.5 * float((var + mu**2 - 1 - np.log(var)).sum()), rel=1e-10)
    assert got["mean_norm"] == pytest.approx(float(np.linalg.norm(mu)), rel=1e-10)
    with pytest.raises(ValueError):
        metrics.latent_gaussianity(torch.zeros(1, 1))


def test_eval_pass_keeps_spatial_latents_and_knn_flattens_them(tiny_shards: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator

    from aedist.evaluation import evaluate_split, knn_metric
    from aedist.evaluation.figures import load_probe

    cfg = _cfg(tiny_shards, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    acc = Accelerator(cpu=True)
    values, (latents, labels) = evaluate_split(model, cfg, acc, "test")
    assert latents["clean"].shape == (64, *SHAPE) and labels.shape == (64,)
    x, _ = load_probe(cfg, torch.device("cpu"))  # the first 16 test images, in the same order
    with torch.no_grad():
        np.testing.assert_allclose(latents["clean"][:16], model.eval().encode(x).numpy(), rtol=1e-5, atol=1e-6)
    assert values["test/loss"] > values["test/recon"] > 0  # the loss holds the spatial posterior's KL term
    knn = knn_metric(model, cfg, acc, (latents, labels))
    # The kNN sees flattened 98-D vectors: the same accuracy as on latents flattened here.
    with torch.no_grad():
        from aedist.evaluation.passes import eval_batches
        train = [(model.encode(im.float() / 255), y) for im, y in eval_batches(cfg, acc, "train", cfg.eval.knn_train)]
    tz, ty = torch.cat([z for z, _ in train]).numpy().reshape(-1, 98), torch.cat([y for _, y in train]).numpy()
    assert knn["test/knn_acc"] == pytest.approx(metrics.knn_accuracy(tz, ty, latents["clean"].reshape(64, 98), labels, k=5))


def _probe(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    from aedist.evaluation.figures import load_probe

    return load_probe(cfg, torch.device("cpu"))


def test_figures_of_a_spatial_kl_model(tiny_shards: Path, tmp_path: Path) -> None:
    from aedist.evaluation import draw_figures

    cfg = _cfg(tiny_shards, tmp_path, "corruption=[{rotate: {max_degrees: 180}}]")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x, y = _probe(cfg)
    with torch.no_grad():
        z = model.eval().encode(x).numpy()
    model.decoded_shapes.clear()
    figs = draw_figures(model.train(), cfg, (x, y), ({"clean": z}, y.numpy()), ["a", "b", "c", "d"], full=True)
    assert model.training  # draw_figures gives the model back in the mode it found it in
    assert {"figures/recon", "figures/recon_error", "figures/latent_pca", "figures/latent_tsne", "figures/latent_tsne3d",
            "figures/interpolation", "figures/rotation_panel", "figures/prior_samples"} <= set(figs)
    assert "figures/latent_grid" not in figs and "figures/latent" not in figs and "figures/recon_ema" not in figs
    # Prior samples are drawn at [64, *latent_shape]; the interpolation decodes a 10-point path of spatial latents.
    assert (64, *SHAPE) in model.decoded_shapes and (10, *SHAPE) in model.decoded_shapes
    # The scatter projects the flattened latent and says so in its title.
    flat = visuals.latent_scatter(z.reshape(16, -1), y, ["a", "b", "c", "d"], method="pca",
                                  title="Latent space, 2x7x7 flattened to D=98 (PCA), N=16")
    np.testing.assert_array_equal(figs["figures/latent_pca"], flat)
    # The error-map figure is error_grid of exactly this model's reconstruction of the clean probe.
    with torch.no_grad():
        recon = model.eval()(x).recon
    np.testing.assert_array_equal(figs["figures/recon_error"], visuals.error_grid(x, [("recon", recon)]))


def test_flat_vae_keeps_its_plane_and_prior_shapes(tiny_shards: Path, tmp_path: Path) -> None:
    from aedist.evaluation import draw_figures

    cfg = _cfg(tiny_shards, tmp_path, "model.name=conv_vae", "model.latent_dim=2", "model.channels=[8, 16]")
    model = build_model(cfg.model)
    shapes: list[tuple[int, ...]] = []
    decode = model.decode
    model.decode = lambda z: (shapes.append(tuple(z.shape)), decode(z))[1]  # type: ignore[method-assign]
    x, y = _probe(cfg)
    figs = draw_figures(model, cfg, (x, y), ({"clean": np.random.default_rng(0).normal(size=(16, 2))}, y.numpy()), [], full=False)
    assert {"figures/latent", "figures/prior_samples", "figures/latent_grid"} <= set(figs)
    assert shapes.count((64, 2)) == 2  # 64 prior draws and the 8x8 plane


def test_error_grid_heat_row_is_the_channel_mean_abs_error() -> None:
    clean = torch.full((3, 3, 6, 6), 0.25)
    recon = clean.clone()
    recon[1, 0, 2, 3] = 0.75  # |err| 0.5 in one of 3 channels -> 0.5 / 3 at (2, 3) of image 1
    recon[0, :, 0, 0] = 1.0  # |err| 0.75 in every channel: the largest error, the top of the colour scale
    grid = visuals.error_grid(clean, [("recon", recon)], annotate=False)
    err = np.abs(clean.numpy() - recon.numpy()).mean(axis=1)  # [3, 6, 6]
    rgb = colormaps["inferno"](err / err.max())[..., :3]
    expected = (rgb * 255 + 0.5).astype(np.uint8)
    for i in range(3):  # row 2 (after input and recon) holds the error maps; cells are 6 px plus 2 px padding
        cell = grid[2 + 2 * 8: 2 + 2 * 8 + 6, 2 + i * 8: 2 + i * 8 + 6]
        np.testing.assert_array_equal(cell, expected[i])
    assert tuple(grid[2 + 16, 2]) == tuple((np.array(colormaps["inferno"](1.0)[:3]) * 255 + 0.5).astype(np.uint8))
    # Rows 0 and 1 are the images themselves, grey repeated to RGB.
    np.testing.assert_array_equal(grid[2 + 8: 2 + 8 + 6, 2 + 8: 2 + 8 + 6], (recon[1].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


def test_ema_reconstructions_appear_only_with_an_ema_model(tiny_shards: Path, tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from aedist.evaluation import draw_figures

    cfg = _cfg(tiny_shards, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema.update_parameters(model)  # the first update copies the weights; the second one averages
    with torch.no_grad():
        for p in model.parameters():  # move the raw model so the EMA differs from it
            p.add_(0.05 * torch.randn_like(p))
    ema.update_parameters(model)
    x, y = _probe(cfg)
    latents = ({"clean": np.random.default_rng(0).normal(size=(16, *SHAPE))}, y.numpy())
    ema.train()
    figs = draw_figures(model, cfg, (x, y), latents, [], full=False, ema_model=ema)
    assert ema.training and model.training
    with torch.no_grad():
        raw, smooth = model.eval()(x).recon, ema.eval()(x).recon
    assert not torch.allclose(raw, smooth)
    expected = visuals.error_grid(x, [("raw", raw), ("EMA", smooth)], title="Raw and EMA reconstructions, |x - x_hat|")
    np.testing.assert_array_equal(figs["figures/recon_ema"], expected)
    assert "figures/recon_ema" not in draw_figures(model, cfg, (x, y), latents, [], full=False)
