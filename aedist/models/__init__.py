"""Model registry: ``build_model(cfg.model)`` -> a plain nn.Module with encode / decode / forward.

    python -m aedist.models configs/seeds/fashion_rotated.yaml   # prints the model and its parameter counts
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError
from torch import nn

from aedist.config import ModelConfig
from aedist.errors import UserError
from aedist.models.ae import AEOutput, Autoencoder
from aedist.models.conv import ConvDecoder, ConvEncoder
from aedist.models.diffusers_kl import KLParams, build_diffusers_kl
from aedist.models.mlp import MLPDecoder, MLPEncoder
from aedist.models.vae import VAE
from aedist.registry import Registry

__all__ = ["AEOutput", "MODELS", "build_model", "count_params", "is_variational", "register_model"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered builder; ``params`` is the (pydantic) dataclass of its own ``model.params`` keys."""

    name: str
    build: Callable[..., nn.Module]
    params: type | None = None

    def check_params(self, cfg: ModelConfig) -> Any:
        """``cfg.params`` validated against this model's schema (None for models without one)."""
        if self.params is None:
            if cfg.params:
                raise UserError(f"config key 'model.params': model '{self.name}' takes no params, got {sorted(cfg.params)}")
            return None
        try:
            return TypeAdapter(self.params).validate_python(cfg.params)
        except ValidationError as err:
            e = err.errors()[0]
            key = ".".join(map(str, ("model.params", *e["loc"])))
            raise UserError(f"config key '{key}': bad value {e['input']!r}; {e['msg']}") from None

    def __call__(self, cfg: ModelConfig) -> nn.Module:
        params = self.check_params(cfg)
        return self.build(cfg) if self.params is None else self.build(cfg, params)


MODELS: Registry[ModelEntry] = Registry("model", wrap=ModelEntry)
register_model = MODELS.register  # @register_model("name"[, params=MyParams]) def build(cfg[, params]) -> nn.Module


def _bodies(cfg: ModelConfig, kind: str) -> tuple[nn.Module, nn.Module, int]:
    if kind == "conv":
        enc = ConvEncoder(cfg)
        return enc, ConvDecoder(cfg), enc.feature_dim
    if cfg.latent_dim == 0:
        raise UserError("model.latent_dim=0 only applies to conv models; set a latent size for MLP models")
    mlp = MLPEncoder(cfg)
    return mlp, MLPDecoder(cfg), mlp.feature_dim


# MLP decoders start with a hidden layer, which always has its ReLU; conv decoders follow latent_act.
@register_model("conv_ae")
def conv_ae(cfg: ModelConfig) -> nn.Module:
    return Autoencoder(*_bodies(cfg, "conv"), cfg.latent_dim, cfg.latent_act, cfg.latent_act)


@register_model("mlp_ae")
def mlp_ae(cfg: ModelConfig) -> nn.Module:
    return Autoencoder(*_bodies(cfg, "mlp"), cfg.latent_dim, cfg.latent_act, True)


@register_model("conv_vae")
def conv_vae(cfg: ModelConfig) -> nn.Module:
    if cfg.latent_dim == 0:
        raise UserError("model.latent_dim must be > 0 for conv_vae (the Gaussian head needs a size)")
    return VAE(*_bodies(cfg, "conv"), cfg.latent_dim, cfg.latent_act)


@register_model("mlp_vae")
def mlp_vae(cfg: ModelConfig) -> nn.Module:
    return VAE(*_bodies(cfg, "mlp"), cfg.latent_dim, True)


# Latent-diffusion first stage: diffusers' AutoencoderKL, its constructor arguments under model.params.
register_model("diffusers_kl", params=KLParams)(build_diffusers_kl)


def _xavier(module: nn.Module) -> None:
    # Seed 001's init: Xavier-uniform weights and bias 0.01 on Conv2d and Linear (not the transposed convs).
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.constant_(module.bias, 0.01)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the registered model ``cfg.name``; a name not in the registry is a UserError."""
    model = MODELS.get(cfg.name, key="model.name")(cfg)
    if cfg.init == "xavier":
        model.apply(_xavier)
    return model


def is_variational(model: nn.Module) -> bool:
    """Whether ``model`` outputs a posterior (mu, logvar), so its loss has a KL term."""
    return bool(getattr(model, "variational", False)) or hasattr(getattr(model, "encoder", None), "logvar")


def count_params(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
