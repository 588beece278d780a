"""The latent-diffusion first-stage objective: reconstruction + LPIPS + KL + an adaptively weighted PatchGAN.

    objective: {name: lpips_gan, params: {disc_start: 50001, perceptual_weight: 1.0, disc_weight: 0.5}}
    loss: {name: l1, beta: 1.0e-6}        # the reconstruction term and the KL weight come from the loss section

For a model output x̂ of target x, with ``nll = rec(x̂, x) + perceptual_weight * LPIPS(x̂, x)``:

    model:  nll + beta * KL + [step >= disc_start] * disc_weight * λ * G(D(x̂))
            λ = ‖∇_w nll‖ / (‖∇_w G‖ + 1e-4), clamped to [0, adaptive_clamp] and detached,
            w = the decoder's last layer (CompVis ``contperceptual.py``, generative-models ``discriminator_loss.py``)
    disc:   [step >= disc_start] * D_loss(D(x), D(x̂.detach()))     on its own optimizer (disc_lr, disc_betas)

Every term is a per-pixel mean (KL per pixel, as aedist's VAEs), so beta has latent-diffusion's meaning
(their sums over pixels divided by the same pixel count) and λ is unchanged by it. Before ``disc_start``
the discriminator takes no step and its loss is not computed. The generator's adversarial pass goes
through the unwrapped discriminator with its weights frozen: gradients reach only the model, and DDP
sees one forward and one backward of the discriminator per micro-batch, in its own loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from aedist.batch import Batch
from aedist.config import Config
from aedist.evaluation.backbones import check_backbones, load_backbone
from aedist.losses import LOSSES, kl_divergence
from aedist.models.patchgan import PatchGAN
from aedist.objectives import Backward, Objective, last_layer, register_objective


@dataclass(config=ConfigDict(extra="forbid"))
class LpipsGanParams:
    """``objective.params`` of ``lpips_gan``."""

    perceptual_weight: float = Field(1.0, ge=0.0, description="Weight of LPIPS(x̂, x); 0 = no perceptual network (no weights needed).")
    lpips_net: Literal["vgg", "alex"] = Field("vgg", description="LPIPS backbone (latent-diffusion uses vgg).")
    disc_start: int = Field(50001, ge=0, description="Optimizer step from which the discriminator trains and its loss counts.")
    disc_weight: float = Field(0.5, ge=0.0, description="Scale of the adaptively weighted generator loss.")
    adaptive_clamp: float = Field(1e4, gt=0.0, description="Upper clamp of the adaptive weight λ.")
    gen_loss: Literal["hinge", "non_saturating"] = Field("hinge", description="Generator loss: -mean D(x̂), or softplus(-D(x̂)).")
    disc_loss: Literal["hinge", "vanilla"] = Field("hinge", description="Discriminator loss on real and reconstructed logits.")
    disc_layers: int = Field(3, ge=1, le=6, description="PatchGAN n_layers (3: 70x70 px patches).")
    disc_ndf: int = Field(64, ge=1, description="PatchGAN width of its first conv.")
    disc_norm: Literal["batch", "group", "none"] = Field("batch", description="PatchGAN normalization; batch is per rank under DDP, group is world-size invariant.")
    disc_lr: float | None = Field(None, gt=0.0, description="Discriminator learning rate (default: optim.lr).")
    disc_betas: tuple[float, float] = Field((0.5, 0.9), description="Discriminator Adam betas (with optim.name=sgd the discriminator uses SGD too).")


def adaptive_weight(nll: torch.Tensor, gen: torch.Tensor, layer: torch.Tensor, clamp: float = 1e4) -> torch.Tensor:
    """λ = ‖∇_layer nll‖ / (‖∇_layer gen‖ + 1e-4), clamped to [0, clamp], detached (a 0-d tensor).

    Under DDP the two gradients are averaged over ranks first (one small all-reduce of one layer's
    gradients), so λ is the one the whole batch gives and a 2-rank step equals the 1-rank step; a
    per-rank λ (what latent-diffusion's Lightning code computes) would scale each rank's term differently.
    """
    grads = torch.stack([torch.autograd.grad(loss, layer, retain_graph=True)[0].float() for loss in (nll, gen)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(grads)
        grads = grads / dist.get_world_size()
    return (grads[0].norm() / (grads[1].norm() + 1e-4)).clamp(0.0, clamp).detach()


def generator_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return -logits_fake.float().mean()
    return F.softplus(-logits_fake.float()).mean()


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` take no gradient inside the block."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


@register_objective("lpips_gan", params=LpipsGanParams)
class LpipsGan(Objective):
    """Model + PatchGAN discriminator; LPIPS frozen (see the module docstring for the terms)."""

    def __init__(self, cfg: Config, params: LpipsGanParams) -> None:
        super().__init__(cfg, params)
        self.disc = PatchGAN(cfg.model.in_channels, params.disc_ndf, params.disc_layers, params.disc_norm)
        self.uses_lpips = params.perceptual_weight > 0
        if self.uses_lpips:  # missing VGG/AlexNet weights on an offline node: one line now, not a crash at step 1
            check_backbones(["lpips"], params.lpips_net)

    def trainable(self) -> dict[str, nn.Module]:
        return {"disc": self.disc}

    def describe(self) -> str:
        p, c = self.params, self.cfg.loss
        perceptual = (f"{p.perceptual_weight:g} * LPIPS-{p.lpips_net}" if self.uses_lpips
                      else "no LPIPS term (objective.params.perceptual_weight=0: its weights are not needed)")
        return (f"objective lpips_gan: {c.name} + {perceptual} + {c.beta:g} * KL (models with a posterior) + {p.disc_weight:g} * λ * {p.gen_loss} GAN loss; "
                f"PatchGAN ({p.disc_layers} layers, ndf {p.disc_ndf}, {p.disc_norm} norm, {p.disc_loss} loss) from step {p.disc_start + 1}")

    def optimizers(self, networks: dict[str, nn.Module], on_cuda: bool) -> dict[str, torch.optim.Optimizer]:
        p = self.params
        o = self.cfg.optim
        lr = p.disc_lr if p.disc_lr is not None else o.lr
        params = networks["disc"].parameters()
        fused = o.fused is not False or None  # as the model's: fused kernels skip a non-finite step on the device
        if o.name == "sgd":  # the model's optimizer family, with the discriminator's own learning rate
            return {"disc": torch.optim.SGD(params, lr=lr, momentum=o.momentum, fused=fused)}
        return {"disc": torch.optim.Adam(params, lr=lr, betas=tuple(p.disc_betas), fused=fused)}

    def _lpips(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS of model-space images (in [-1, 1] where data.normalize, else [0, 1])."""
        def scale(x: torch.Tensor) -> torch.Tensor:
            x = x if self.cfg.data.normalize else x * 2.0 - 1.0
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

        # The same frozen, eval-mode network the lpips metric uses (built once per process and device).
        net = load_backbone("lpips", self.params.lpips_net, pred.device)
        return net(scale(pred), scale(target)).float().mean()

    def micro_step(self, model: nn.Module, forward: Callable[[torch.Tensor], Any], batch: Batch, step: int,
                   networks: dict[str, nn.Module], backward: Backward) -> dict[str, torch.Tensor]:
        p, cfg = self.params, self.cfg
        out = forward(batch.inputs)
        x, xr = batch.targets, out.recon
        rec = LOSSES.get(cfg.loss.name, key="loss.name")(xr, x)
        terms: dict[str, torch.Tensor] = {"recon": rec}
        nll = rec
        if self.uses_lpips:
            terms["perceptual"] = self._lpips(xr, x)
            nll = nll + p.perceptual_weight * terms["perceptual"]
        total = nll
        if out.mu is not None and out.logvar is not None:
            terms["kl"] = kl_divergence(out.mu, out.logvar) / x[0].numel()
            total = total + cfg.loss.beta * terms["kl"]
        active = step >= p.disc_start
        if active:
            with frozen(self.disc):  # the unwrapped net: DDP's reducer must not see this pass
                gen = generator_loss(self.disc(xr), p.gen_loss)
            weight = adaptive_weight(nll, gen, last_layer(model), p.adaptive_clamp)
            terms.update(gen=gen, adaptive_weight=weight)
            total = total + p.disc_weight * weight * gen
        terms["loss"] = total
        backward(total, "loss")
        if active:
            # One forward of real and reconstructed images together: one DDP forward per backward.
            logits = networks["disc"](torch.cat([x.detach(), xr.detach()]))
            real, fake = logits.chunk(2)
            terms["disc_loss"] = discriminator_loss(real, fake, p.disc_loss)
            terms.update(logits_real=real.detach().float().mean(), logits_fake=fake.detach().float().mean())
            backward(terms["disc_loss"], "disc_loss")
        return terms
