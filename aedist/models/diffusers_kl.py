"""Latent-diffusion first stages from diffusers: ``model.name: diffusers_kl`` wraps ``AutoencoderKL``.

    model: {name: diffusers_kl, in_channels: 3, image_size: 64,
            params: {block_out_channels: [64, 128, 256], latent_channels: 3}}     # f=4: [B, 3, 16, 16] latents
    model: {name: diffusers_kl, in_channels: 3, image_size: 256,
            params: {pretrained: stabilityai/sd-vae-ft-mse}}                      # fine-tune the SD VAE

The architecture is diffusers' own (the same modules the Stable Diffusion pipelines load), so a model
trained here leaves with ``export_pretrained`` as a ``save_pretrained`` folder any diffusers pipeline
reads, and a ``pretrained`` folder or hub id starts a run from existing weights. The wrapper only
adapts the interface: ``encode`` -> the posterior mean ``[B, C, h, w]``, ``forward`` -> AEOutput with
mu/logvar, sampled z while training (the same reparameterisation as aedist's VAE, drawn from torch's
global RNG so runs stay seeded). diffusers VAEs see images in [-1, 1]: set ``data.normalize: true``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from aedist.config import ModelConfig
from aedist.errors import UserError
from aedist.models.ae import AEOutput


@dataclass(config=ConfigDict(extra="forbid"))
class KLParams:
    """``model.params`` of ``diffusers_kl``: diffusers ``AutoencoderKL`` constructor arguments."""

    block_out_channels: list[int] = Field(default_factory=lambda: [128, 256, 512, 512],
                                          description="Channels per resolution; f = 2^(len - 1) (SD VAE: f=8).")
    layers_per_block: int = Field(2, ge=1, description="ResNet blocks per resolution.")
    latent_channels: int = Field(4, ge=1, description="Channels C of the [B, C, h, w] latent.")
    norm_num_groups: int = Field(32, ge=1, description="GroupNorm groups; must divide every block's channels.")
    act_fn: str = Field("silu", description="Activation inside the blocks.")
    mid_block_add_attention: bool = Field(True, description="Self-attention in the middle block at the lowest resolution.")
    pretrained: str | None = Field(None, description="save_pretrained folder or hub id to start from; the other params then come from it.")
    subfolder: str | None = Field(None, description="Subfolder of `pretrained` holding the VAE, e.g. 'vae' of a full pipeline repo.")


class DiffusersKL(nn.Module):
    """x [B, C_in, H, W] -> posterior N(mu, exp(logvar)) over [B, C, H/f, W/f] -> x_hat [B, C_in, H, W]."""

    variational = True

    def __init__(self, vae: nn.Module, image_size: int) -> None:
        super().__init__()
        self.vae = vae
        c = vae.config
        self.factor = 2 ** (len(c.block_out_channels) - 1)
        if image_size % self.factor:
            raise UserError(f"model.image_size={image_size} is not a multiple of the downsampling factor {self.factor} "
                            f"(2^(len(model.params.block_out_channels) - 1)); crop to a multiple of {self.factor}")
        self.latent_shape = (c.latent_channels, image_size // self.factor, image_size // self.factor)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C_in, H, W] -> (mu, logvar), each [B, C, h, w] (logvar clamped to [-30, 20] by diffusers)."""
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean, posterior.logvar

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> mu [B, C, h, w]."""
        return self.moments(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> x_hat [B, C_in, H, W] (unbounded; [-1, 1] is the data range)."""
        return self.vae.decode(z).sample

    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where adversarial losses balance their gradients."""
        return self.vae.decoder.conv_out.weight

    def forward(self, x: torch.Tensor) -> AEOutput:
        mu, logvar = self.moments(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return AEOutput(self.decode(z), z, mu, logvar)


def build_diffusers_kl(cfg: ModelConfig, p: KLParams) -> DiffusersKL:
    """A fresh AutoencoderKL from ``p``, or the ``p.pretrained`` one; its channels must match ``cfg``."""
    from diffusers import AutoencoderKL

    if p.pretrained:
        vae = _from_pretrained(AutoencoderKL, p.pretrained, p.subfolder)
        if vae.config.in_channels != cfg.in_channels:
            raise UserError(f"model.params.pretrained={p.pretrained} takes {vae.config.in_channels}-channel images but "
                            f"model.in_channels={cfg.in_channels}; set model.in_channels={vae.config.in_channels}")
    else:
        if any(ch % p.norm_num_groups for ch in p.block_out_channels):
            raise UserError(f"config key 'model.params.norm_num_groups': {p.norm_num_groups} does not divide "
                            f"block_out_channels {p.block_out_channels}; pick a common divisor")
        n = len(p.block_out_channels)
        vae = AutoencoderKL(
            in_channels=cfg.in_channels, out_channels=cfg.in_channels, block_out_channels=tuple(p.block_out_channels),
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=p.layers_per_block, latent_channels=p.latent_channels, norm_num_groups=p.norm_num_groups,
            act_fn=p.act_fn, sample_size=cfg.image_size, mid_block_add_attention=p.mid_block_add_attention,
        )
    return DiffusersKL(vae, cfg.image_size)


def _from_pretrained(cls: type, source: str, subfolder: str | None) -> nn.Module:
    """``cls.from_pretrained`` with a one-line error for a missing folder or an unreachable hub."""
    local = Path(source).expanduser()
    try:
        return cls.from_pretrained(str(local) if local.exists() else source, subfolder=subfolder)
    except (OSError, ValueError) as err:
        where = f"folder {local}" if local.exists() else f"'{source}' (not a local folder; as a hub id it needs network or the HF cache)"
        raise UserError(f"model.params.pretrained: cannot load an AutoencoderKL from {where}: {str(err).splitlines()[0]}; "
                        "pass a save_pretrained folder (with config.json) or download it on a machine with network") from None


def export_pretrained(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the wrapped AutoencoderKL as a diffusers ``save_pretrained`` folder (safetensors)."""
    if not isinstance(model, DiffusersKL):
        raise UserError(f"only diffusers_kl models export to diffusers, not {type(model).__name__}")
    model.vae.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
