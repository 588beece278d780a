"""Your own model, loss, metric, corruption and figure in one file, used without editing aedist/.

    python launch/train.py --config configs/debug.yaml --import examples/aeparts.py \
        model.name=tiny_mlp_ae "model.params={width: 32}" loss.name=huber "eval.metrics=[mse, mae]" \
        "corruption=[{invert: {p: 0.5}}]"

or ``imports: [examples/aeparts.py]`` in the config. Each entry registers itself here, at import;
README "Layout and extending" explains them, tests/test_extending.py and tests/test_imports.py run them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

from aedist import visuals
from aedist.config import ModelConfig
from aedist.data.corruption import CORRUPTIONS
from aedist.evaluation.figures import FIGURES, FigureContext
from aedist.losses import LOSSES
from aedist.metrics import METRICS
from aedist.models import Autoencoder, register_model
from aedist.models.mlp import MLPDecoder, MLPEncoder


# A model: its own options go under model.params, validated by its schema.
@dataclass
class TinyParams:
    width: int = 64


@register_model("tiny_mlp_ae", params=TinyParams)
def tiny_mlp_ae(cfg: ModelConfig, params: TinyParams) -> nn.Module:  # model: {name: tiny_mlp_ae, params: {width: 32}}
    cfg = replace(cfg, hidden=[params.width])
    enc = MLPEncoder(cfg)
    return Autoencoder(enc, MLPDecoder(cfg), enc.feature_dim, cfg.latent_dim, False, True)


# A loss: loss.name=huber.
@LOSSES.register("huber")
def huber(pred: Tensor, target: Tensor) -> Tensor:
    return F.smooth_l1_loss(pred.float(), target.float(), beta=0.1)


# A metric: eval.metrics=[mse, mae], reported as test/mae etc.
@METRICS.register("mae")
def mae(pred: Tensor, target: Tensor) -> Tensor:  # float64 [B, P] -> one value per image [B]
    return (pred - target).abs().mean(dim=1)


# A corruption: corruption=[{invert: {p: 0.5}}] (or under eval.corruptions).
@CORRUPTIONS.register("invert", params={"p": (float, 1.0, 0.0)})
def invert(x: Tensor, p: dict[str, Any], generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
    # -> (inputs, draws); geometric=/grows_batch=/fits= in register() describe what it does to a batch
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p["p"]
    return torch.where(flip.view(-1, 1, 1, 1), 1 - x, x), {"flip": flip}


# A figure: figures/first_recon in W&B, TensorBoard and runs/NAME/figures/.
@FIGURES.register("first_recon")
def first_recon(ctx: FigureContext) -> dict[str, np.ndarray]:  # ctx: model, cfg, probe x/y, latents, class names
    return {"figures/first_recon": visuals.image_grid(ctx.recon(ctx.x[:8]), nrow=8)}
