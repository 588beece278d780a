"""The deterministic autoencoder: an encoder body, a linear latent head, and a decoder body."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class AEOutput(NamedTuple):
    """What ``forward`` returns; ``mu``/``logvar`` are None for deterministic models."""

    recon: torch.Tensor
    z: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None


def latent_head(feature_dim: int, latent_dim: int, act: bool) -> list[nn.Module]:
    """Linear feature -> latent (+ ReLU); nothing when ``latent_dim`` is 0 (the map is the latent)."""
    if latent_dim == 0:
        return []
    return [nn.Linear(feature_dim, latent_dim), *([nn.ReLU()] if act else [])]


def decoder_head(latent_dim: int, feature_dim: int, act: bool) -> list[nn.Module]:
    """Linear latent -> feature (+ ReLU), the mirror of :func:`latent_head`."""
    if latent_dim == 0:
        return []
    return [nn.Linear(latent_dim, feature_dim), *([nn.ReLU()] if act else [])]


class Autoencoder(nn.Module):
    """x [B,C,H,W] -> z [B,D] -> x_hat [B,C,H,W]; ``encoder`` and ``decoder`` are plain Sequentials.

    ``latent_shape`` is one latent without the batch dim, ``(D,)`` here; every model has it (spatial
    models have ``(C, h, w)``), and consumers that need a latent's shape read it rather than ``latent_dim``.
    """

    def __init__(self, body: nn.Module, decoder_body: nn.Module, feature_dim: int, latent_dim: int,
                 latent_act: bool, decoder_act: bool) -> None:
        super().__init__()
        self.latent_dim = latent_dim or feature_dim
        self.latent_shape: tuple[int, ...] = (self.latent_dim,)
        self.encoder = nn.Sequential(body, *latent_head(feature_dim, latent_dim, latent_act))
        self.decoder = nn.Sequential(*decoder_head(latent_dim, feature_dim, decoder_act), decoder_body)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] -> z [B,D]."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,D] -> x_hat [B,C,H,W]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> AEOutput:
        z = self.encode(x)
        return AEOutput(self.decode(z), z)
