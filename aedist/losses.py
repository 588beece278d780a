"""Reconstruction losses and the VAE objective; every loss returns named terms with ``loss`` the total.

Terms are means over pixels so an AE's and a VAE's ``recon`` are comparable. The VAE's KL is summed
over latent elements (every non-batch dim, so spatial ``[B, C, h, w]`` latents too), averaged over the
batch and divided by the pixels per image, which keeps ``recon + beta * kl`` proportional to the
per-pixel negative ELBO.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import reduce

from aedist.config import LossConfig
from aedist.models.ae import AEOutput
from aedist.models.vae import LOGVAR_CLAMP
from aedist.registry import Registry

# Reconstruction losses: (pred, target) -> mean per-pixel loss, always reduced in float32.
LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("loss")


@LOSSES.register("mse")
def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel squared error."""
    return F.mse_loss(pred.float(), target.float())


@LOSSES.register("l1")
def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel absolute error (latent-diffusion first stages train with it)."""
    return F.l1_loss(pred.float(), target.float())


@LOSSES.register("bce")
def bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel binary cross-entropy on clamped probabilities (BCE is not autocast-safe)."""
    return F.binary_cross_entropy(pred.float().clamp(1e-6, 1 - 1e-6), target.float())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over all latent elements, mean over the batch; float32, clamped logvar.

    ``mu``, ``logvar``: ``[B, *latent_shape]``, flat ``[B, D]`` or spatial ``[B, C, h, w]``; a spatial
    latent is one Gaussian over all C·h·w elements, so its KL sums over every non-batch dim.
    """
    mu, logvar = mu.float(), logvar.float().clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)
    return reduce(0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar), "b ... -> b", "sum").mean()


def compute_loss(out: AEOutput, target: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Named loss terms for a model output: ``loss`` (what is minimised), ``recon`` and, for VAEs, ``kl``."""
    recon = LOSSES.get(cfg.name, key="loss.name")(out.recon, target)
    if out.mu is None or out.logvar is None:
        return {"loss": recon, "recon": recon}
    kl = kl_divergence(out.mu, out.logvar) / target[0].numel()
    return {"loss": recon + cfg.beta * kl, "recon": recon, "kl": kl}
