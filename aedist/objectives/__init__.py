"""Objectives: what one training step is — which networks train, on which optimizers, with which loss terms.

    objective: {name: reconstruction}                  # the default: the loss section, one network, one optimizer
    objective: {name: lpips_gan, params: {disc_start: 50001, perceptual_weight: 1.0}}

The Trainer owns the loop, the Accelerator, NaN skipping, checkpoints and logging; an objective owns
the rest. It declares its extra trainable networks (a discriminator) and their optimizers; the Trainer
prepares, clips, steps, checkpoints and resumes every one of them with the same code, and calls
:meth:`Objective.micro_step` once per micro-batch. ``micro_step`` runs the forward passes and calls
``backward`` for each loss it minimises; it returns the terms to log (``loss`` is the model's total).

    @register_objective("my_objective", params=MyParams)
    class MyObjective(Objective): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from aedist.batch import Batch
from aedist.config import Config
from aedist.errors import UserError
from aedist.losses import compute_loss
from aedist.registry import Registry

Backward = Callable[[torch.Tensor, str], None]  # backward(loss, name): accelerator.backward + the NaN guard's bookkeeping


@dataclass(frozen=True)
class ObjectiveEntry:
    """A registered objective class; ``params`` is the (pydantic) dataclass of its ``objective.params``."""

    name: str
    cls: type[Objective]
    params: type | None = None

    def check_params(self, raw: dict[str, Any]) -> Any:
        """``raw`` validated against the schema; a one-line UserError naming the key otherwise."""
        if self.params is None:
            if raw:
                raise UserError(f"config key 'objective.params': objective '{self.name}' takes no params, got {sorted(raw)}")
            return None
        try:
            return TypeAdapter(self.params).validate_python(raw)
        except ValidationError as err:
            e = err.errors()[0]
            key = ".".join(map(str, ("objective.params", *e["loc"])))
            raise UserError(f"config key '{key}': bad value {e.get('input')!r}; {e['msg']}") from None


OBJECTIVES: Registry[ObjectiveEntry] = Registry("objective", wrap=ObjectiveEntry)
register_objective = OBJECTIVES.register


class Objective(nn.Module):
    """Base objective: reconstruction (+ beta * KL for models with a posterior) on the model alone.

    Subclasses add networks in :meth:`trainable` (each gets its own optimizer from :meth:`optimizers`)
    and frozen helpers (a perceptual network) as plain submodules, which the Trainer moves to the device.
    """

    def __init__(self, cfg: Config, params: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.params = params

    def trainable(self) -> dict[str, nn.Module]:
        """Networks trained beside the model, by name (their checkpoint files follow the model's)."""
        return {}

    def optimizers(self, networks: dict[str, nn.Module], on_cuda: bool) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per network of :meth:`trainable`."""
        return {}

    def describe(self) -> str:
        """One line for the start of a run: what is minimised."""
        c = self.cfg.loss
        return f"objective reconstruction: {c.name}" + (f" + {c.beta:g} * KL (models with a posterior)" if c.beta else "")

    def micro_step(self, model: nn.Module, forward: Callable[[torch.Tensor], Any], batch: Batch, step: int,
                   networks: dict[str, nn.Module], backward: Backward) -> dict[str, torch.Tensor]:
        """Forward, losses and backward for one micro-batch of optimizer step ``step`` (0-based).

        Args:
            model: the unwrapped model (its parameters, e.g. the decoder's last layer).
            forward: what to call for the training forward (DDP-wrapped and maybe compiled).
            networks: the prepared (DDP-wrapped) networks of :meth:`trainable`.
        """
        terms = compute_loss(forward(batch.inputs), batch.targets, self.cfg.loss)
        backward(terms["loss"], "loss")
        return terms


register_objective("reconstruction")(Objective)


def build_objective(cfg: Config) -> Objective:
    """The objective ``cfg.objective.name`` with its validated params."""
    entry = OBJECTIVES.get(cfg.objective.name, key="objective.name")
    return entry.cls(cfg, entry.check_params(cfg.objective.params))


def last_layer(model: nn.Module) -> torch.Tensor:
    """The weight of the decoder's output layer, where an adversarial loss is balanced against the
    reconstruction: ``model.last_layer()`` where a model defines it, else the last conv/linear weight
    of ``model.decoder``."""
    if hasattr(model, "last_layer"):
        return model.last_layer()
    layers = [m for m in model.decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    if not layers:
        raise UserError(f"{type(model).__name__} has no conv or linear layer in its decoder to balance the adversarial loss at")
    return layers[-1].weight


from aedist.objectives import lpips_gan  # noqa: E402, F401 - registers lpips_gan (it builds on the base above)
