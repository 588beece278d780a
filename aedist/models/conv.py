"""Convolutional encoders and decoders; the seeds' conv architectures are configurations of these.

A *stage* is one resolution: a conv that changes the channel count (stride 2, or ``first_stride``
for stage 0) and, with ``convs_per_stage=2``, a stride-1 conv after it. The decoder mirrors the
encoder layer by layer with ConvTranspose2d, choosing ``output_padding`` from the sizes the encoder
actually produced, so odd sizes (28 -> 14 -> 7 -> 4) come back exactly.

    seed 000: channels=[32, 64, 128], first_stride=2, convs_per_stage=1, latent_dim=2
    seed 001: channels=[48, 96, 192, 384], first_stride=1, convs_per_stage=2, latent_dim=200,
              latent_act=True, output_act=none, init=xavier, dropout=0.2, dropout_at=[0, 1]
    seed 003: channels=[128, 64, 32, 16], latent_dim=0 (the 16x2x2 map is the latent)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops.layers.torch import Rearrange
from torch import nn

from aedist.config import ModelConfig


@dataclass(frozen=True)
class ConvLayer:
    """One encoder conv: channels in/out, stride, the stage it belongs to and its input size."""

    c_in: int
    c_out: int
    stride: int
    stage: int
    size_in: int
    size_out: int


def plan_layers(cfg: ModelConfig) -> list[ConvLayer]:
    """The encoder's conv layers (3x3, padding 1) with the spatial size before and after each."""
    layers, c, size = [], cfg.in_channels, cfg.image_size
    for stage, width in enumerate(cfg.channels):
        strides = [cfg.first_stride if stage == 0 else 2] + [1] * (cfg.convs_per_stage - 1)
        for stride in strides:
            out = (size + 2 - 3) // stride + 1
            layers.append(ConvLayer(c, width, stride, stage, size, out))
            c, size = width, out
    return layers


def _dropout(cfg: ModelConfig, boundary: int | None) -> list[nn.Module]:
    """Dropout2d after every hidden layer (``dropout_at`` empty) or only at the listed stage boundaries."""
    if cfg.dropout <= 0 or (cfg.dropout_at and boundary not in cfg.dropout_at):
        return []
    return [nn.Dropout2d(cfg.dropout)]


def _hidden_block(cfg: ModelConfig, channels: int, boundary: int | None) -> list[nn.Module]:
    norm = [nn.BatchNorm2d(channels)] if cfg.batchnorm else []
    return [*norm, nn.ReLU(), *_dropout(cfg, boundary)]


def _first_of_stage(layers: list[ConvLayer], i: int) -> bool:
    return i == 0 or layers[i - 1].stage != layers[i].stage


class ConvEncoder(nn.Module):
    """x [B,C,H,W] -> flattened feature map [B, feature_dim] (the latent head lives in the model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers = plan_layers(cfg)
        mods: list[nn.Module] = []
        for i, layer in enumerate(layers):
            mods.append(nn.Conv2d(layer.c_in, layer.c_out, 3, stride=layer.stride, padding=1))
            # Seed 001 drops out where the resolution is about to change: after a stage's last conv.
            last_of_stage = i + 1 == len(layers) or _first_of_stage(layers, i + 1)
            mods += _hidden_block(cfg, layer.c_out, layer.stage if last_of_stage else None)
        mods.append(Rearrange("b c h w -> b (c h w)"))
        self.net = nn.Sequential(*mods)
        last = layers[-1]
        self.feature_shape = (last.c_out, last.size_out, last.size_out)
        self.feature_dim = last.c_out * last.size_out**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Flattened feature map [B, feature_dim] -> x_hat [B,C,H,W], mirroring :class:`ConvEncoder`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers = plan_layers(cfg)
        c, s = layers[-1].c_out, layers[-1].size_out
        mods: list[nn.Module] = [Rearrange("b (c h w) -> b c h w", c=c, h=s, w=s)]
        for i in reversed(range(len(layers))):
            layer = layers[i]
            natural = (layer.size_out - 1) * layer.stride - 2 + 3  # ConvTranspose2d size without output_padding
            mods.append(
                nn.ConvTranspose2d(layer.c_out, layer.c_in, 3, layer.stride, padding=1, output_padding=layer.size_in - natural)
            )
            if i == 0:
                break
            # Mirror of the encoder: drop out just before the transposed conv that leaves stage b+1 for b.
            nxt = i - 1
            boundary = layers[nxt].stage - 1 if _first_of_stage(layers, nxt) and layers[nxt].stage > 0 else None
            mods += _hidden_block(cfg, layer.c_in, boundary)
        if cfg.output_act == "sigmoid":
            mods.append(nn.Sigmoid())
        self.net = nn.Sequential(*mods)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
