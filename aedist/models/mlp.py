"""MLP encoder and decoder bodies (seed 004: 784 -> 392 -> 8 -> 392 -> 784, ReLU, Sigmoid output)."""

from __future__ import annotations

import torch
from einops.layers.torch import Rearrange
from torch import nn

from aedist.config import ModelConfig


class MLPEncoder(nn.Module):
    """x [B,C,H,W] -> features [B, hidden[-1]]: flatten, then Linear + ReLU per hidden width."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = [cfg.in_channels * cfg.image_size**2, *cfg.hidden]
        mods: list[nn.Module] = [Rearrange("b c h w -> b (c h w)")]
        for w_in, w_out in zip(widths, widths[1:]):
            mods += [nn.Linear(w_in, w_out), nn.ReLU(), *([nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else [])]
        self.net = nn.Sequential(*mods)
        self.feature_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """features [B, hidden[-1]] -> x_hat [B,C,H,W], the hidden widths in reverse."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = [cfg.in_channels * cfg.image_size**2, *cfg.hidden][::-1]
        mods: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths, widths[1:])):
            mods.append(nn.Linear(w_in, w_out))
            if i + 2 < len(widths):
                mods += [nn.ReLU(), *([nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else [])]
        if cfg.output_act == "sigmoid":
            mods.append(nn.Sigmoid())
        s = cfg.image_size
        mods.append(Rearrange("b (c h w) -> b c h w", c=cfg.in_channels, h=s, w=s))
        self.net = nn.Sequential(*mods)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
