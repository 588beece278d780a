"""Variational autoencoder: the same bodies as the AE with a Gaussian head (mu, logvar)."""

from __future__ import annotations

import torch
from torch import nn

from aedist.models.ae import AEOutput, decoder_head

# exp(logvar) must stay finite in fp16 (max ~65504 = e^11); the loss clamps the same way.
LOGVAR_CLAMP = 10.0


class GaussianEncoder(nn.Module):
    """x -> (mu [B,D], logvar [B,D]) from a shared body and two linear heads."""

    def __init__(self, body: nn.Module, feature_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.body = body
        self.mu = nn.Linear(feature_dim, latent_dim)
        self.logvar = nn.Linear(feature_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h).clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)


class VAE(nn.Module):
    """z ~ N(mu, exp(logvar)) while training; ``encode`` returns the mean, so latents are deterministic."""

    def __init__(self, body: nn.Module, decoder_body: nn.Module, feature_dim: int, latent_dim: int,
                 decoder_act: bool) -> None:
        super().__init__()
        if latent_dim <= 0:
            raise ValueError("a VAE needs model.latent_dim > 0")
        self.latent_dim = latent_dim
        self.latent_shape: tuple[int, ...] = (latent_dim,)  # the shape contract of every model (see Autoencoder)
        self.encoder = GaussianEncoder(body, feature_dim, latent_dim)
        self.decoder = nn.Sequential(*decoder_head(latent_dim, feature_dim, decoder_act), decoder_body)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] -> mu [B,D]."""
        return self.encoder(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,D] -> x_hat [B,C,H,W]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> AEOutput:
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return AEOutput(self.decode(z), z, mu, logvar)
