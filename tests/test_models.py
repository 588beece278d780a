"""Model zoo: the seeds' parameter counts, shape round trips over the registry, losses vs references."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aedist.config import ModelConfig, load_config
from aedist.losses import compute_loss, kl_divergence
from aedist.models import MODELS, build_model, count_params

ROOT = Path(__file__).resolve().parents[1]
RunFn = Callable[..., subprocess.CompletedProcess]  # the run_py / train fixtures


@pytest.mark.parametrize("config, encoder, decoder, total", [
    ("fashion_rotated", None, None, 195_459),           # seed 000
    ("stl10_compress", 13_695_608, 13_750_323, None),   # seed 001
    ("stl10_norm_dropout", 13_695_608, 13_750_323, None),
    ("mnist_mlp", None, None, 622_504),                 # seed 004
])
def test_seed_parameter_counts(config: str, encoder: int | None, decoder: int | None, total: int | None) -> None:
    model = build_model(load_config(ROOT / f"configs/seeds/{config}.yaml").model)
    if encoder is not None:
        assert count_params(model.encoder) == encoder
        assert count_params(model.decoder) == decoder
    if total is not None:
        assert count_params(model) == total


def test_seed_001_dropout_sits_where_resolution_changes() -> None:
    model = build_model(load_config(ROOT / "configs/seeds/stl10_dropout.yaml").model)
    enc = [type(m).__name__ for m in model.encoder.modules()]
    dec = [type(m).__name__ for m in model.decoder.modules()]
    assert enc.count("Dropout2d") == 2 and dec.count("Dropout2d") == 2
    # Encoder: after the 2nd and 4th conv (48 and 96 channels), before the next stride-2 conv.
    convs = [m for m in model.encoder.modules() if isinstance(m, (nn.Conv2d, nn.Dropout2d))]
    names = [type(m).__name__ for m in convs]
    assert names[:6] == ["Conv2d", "Conv2d", "Dropout2d", "Conv2d", "Conv2d", "Dropout2d"]


def test_seed_003_shapes_28_14_7_4_2() -> None:
    model = build_model(load_config(ROOT / "configs/seeds/colored_denoise_ae.yaml").model)
    out = model(torch.rand(3, 3, 28, 28))
    assert out.z.shape == (3, 16 * 2 * 2) and out.recon.shape == (3, 3, 28, 28)
    reg = build_model(load_config(ROOT / "configs/seeds/colored_denoise_reg.yaml").model)
    kinds = {type(m).__name__ for m in reg.modules()}
    assert {"BatchNorm2d", "Dropout2d"} <= kinds


def test_python_m_models_prints_counts(run_py: RunFn) -> None:
    proc = run_py(["-m", "aedist.models", "configs/seeds/mnist_mlp.yaml"])
    assert proc.returncode == 0, proc.stderr
    tail = proc.stdout.strip().splitlines()[-3:]
    assert tail == ["encoder params: 310864", "decoder params: 311640", "total params: 622504"]  # 784·392+392 + 392·8+8 and mirror


@pytest.mark.parametrize("name", sorted(n for n in MODELS if n != "diffusers_kl"))  # spatial latents: tests/test_diffusers_kl.py
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 28), (3, 96)])
def test_every_registered_model_round_trips_shapes(name: str, channels: int, size: int) -> None:
    mlp = name.startswith("mlp")
    cfg = ModelConfig(name=name, in_channels=channels, image_size=size, latent_dim=5,
                      channels=[8, 16] if not mlp else [32], hidden=[32] if mlp else [392])
    model = build_model(cfg)
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.recon.shape == x.shape and out.z.shape == (2, 5)
    assert model.encode(x).shape == (2, 5) and model.decode(out.z).shape == x.shape
    assert out.recon.min() >= 0 and out.recon.max() <= 1  # sigmoid output
    if name.endswith("vae"):
        assert out.mu.shape == out.logvar.shape == (2, 5)
        model.eval()
        assert torch.equal(model(x).z, model(x).mu)  # deterministic latents for plots and kNN
    else:
        assert out.mu is None and out.logvar is None


def test_losses_match_torch_references() -> None:
    from aedist.config import LossConfig

    pred, target = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    from aedist.models import AEOutput

    ae = compute_loss(AEOutput(pred, mu), target, LossConfig())
    assert torch.allclose(ae["loss"], F.mse_loss(pred, target))
    bce = compute_loss(AEOutput(pred, mu), target, LossConfig(name="bce"))
    assert torch.allclose(bce["loss"], F.binary_cross_entropy(pred, target), atol=1e-5)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert torch.allclose(kl_divergence(mu, logvar), ref, atol=1e-5)
    vae = compute_loss(AEOutput(pred, mu, mu, logvar), target, LossConfig(beta=0.5))
    assert torch.allclose(vae["loss"], vae["recon"] + 0.5 * vae["kl"]) and set(vae) == {"loss", "recon", "kl"}


def test_kl_stays_finite_for_extreme_bf16_logvar() -> None:
    mu = torch.zeros(2, 4, dtype=torch.bfloat16)
    logvar = torch.full((2, 4), 80.0, dtype=torch.bfloat16)  # exp(80) overflows fp16 and is huge in bf16
    assert torch.isfinite(kl_divergence(mu, logvar))
