"""The PatchGAN discriminator of pix2pix, as latent-diffusion first stages train it (``NLayerDiscriminator``).

    disc = PatchGAN(in_channels=3, ndf=64, n_layers=3)   # [B, 3, H, W] -> logits [B, 1, H/8 - 2, W/8 - 2]

Each output logit judges one receptive-field patch (70x70 px for n_layers=3) as real or reconstructed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "group", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    # BatchNorm is pix2pix's and latent-diffusion's choice; its statistics are per rank under DDP, so a
    # 2-rank run differs from a 1-rank run. GroupNorm keeps runs identical across world sizes.
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class PatchGAN(nn.Module):
    """Strided 4x4 convs with LeakyReLU(0.2); ``n_layers`` halvings, channels doubling up to 8 * ndf."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: Norm = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution, as in pix2pix
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=norm == "none"),
                       _norm(norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> patch logits [B, 1, h, w]."""
        return self.main(x)


def _init(m: nn.Module) -> None:
    # pix2pix's init: N(0, 0.02) convs, N(1, 0.02) norm scales; the discriminator starts near chance.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
