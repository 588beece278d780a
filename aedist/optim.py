"""Optimizer and learning-rate schedule from the config.

The schedule is stepped by the engine itself (once per optimizer step, or once per epoch on the
validation loss for ReduceLROnPlateau) rather than handed to ``accelerator.prepare``: Accelerate
would step a prepared scheduler once per process, and here ``data.batch_size`` is already global.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from aedist.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over the trainable parameters, fused unless ``optim.fused=false``.

    Fused kernels (CUDA and, since torch 2.4, CPU) take a ``found_inf`` flag, as GradScaler uses them: a
    step whose gradients are not finite is skipped inside the kernel, parameters, moments and step
    count untouched, without the host reading the flag (:func:`step_unless`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = cfg.fused is not False or None
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`step_unless` can skip a step of ``optimizer`` on the device (fused kernels)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one
    return bool(inner.defaults.get("fused")) and getattr(optimizer, "scaler", None) is None


def step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """Step ``optimizer`` unless the 0-d device flag ``bad`` is set, decided inside the fused kernel: no
    host sync. Parameters without a gradient (a network that took no part in the step) are left alone."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        if group.get("momentum"):
            # Fused SGD allocates a missing momentum buffer uninitialised and leaves it so on a skipped
            # step; a zero buffer gives the same first step (buf = grad) and survives a skip intact.
            for p in group["params"]:
                if p.grad is not None and "momentum_buffer" not in inner.state[p]:
                    inner.state[p]["momentum_buffer"] = torch.zeros_like(p)
    inner.found_inf = bad.float()
    try:
        inner.step()
    finally:
        del inner.found_inf


class Schedule:
    """The learning-rate schedule behind three hooks the loop calls: :meth:`after_step` (cosine),
    :meth:`after_epoch` with the epoch-mean train loss and :meth:`after_eval` with the val loss
    (ReduceLROnPlateau, on whichever ``optim.plateau_on`` names). Its state rides in checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = total_steps  # the engine corrects it on an elastic resume; the cosine reads it each step
        self.inner: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        if cfg.scheduler == "plateau":
            self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        elif cfg.scheduler == "cosine":
            warmup = cfg.warmup_steps

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = (step - warmup) / max(1, self.total_steps - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

            self.inner = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def after_step(self) -> None:
        if self.cfg.scheduler == "cosine":
            self.inner.step()

    def after_epoch(self, train_loss: float) -> None:
        if self.cfg.scheduler == "plateau" and self.cfg.plateau_on == "train":
            self.inner.step(train_loss)

    def after_eval(self, val_loss: float | None) -> None:
        if self.cfg.scheduler == "plateau" and self.cfg.plateau_on == "val" and val_loss is not None:
            self.inner.step(val_loss)

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state)


class EMA:
    """Exponential moving average of a model's weights: torch's ``AveragedModel`` with
    ``get_ema_multi_avg_fn`` (buffers averaged too), updated after every applied optimizer step.

    The averaged copy lives beside the trained model on the same device; it is evaluated as
    ``val_ema/``, ``test_ema/`` and saved as ``ema.safetensors`` in every checkpoint, which
    ``launch/evaluate.py`` prefers where present.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        # AveragedModel keeps its count on the CPU; beside the weights the masked update never syncs.
        self.averaged.n_averaged = self.averaged.n_averaged.to(next(model.parameters()).device)

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class as the trained one)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module, bad: torch.Tensor | None = None) -> None:
        """Fold the model's current weights in (the first update copies them), unless the 0-d device flag
        ``bad`` is set: ``AveragedModel.update_parameters`` with ``get_ema_multi_avg_fn``'s arithmetic
        (float tensors lerp towards the model by 1 - decay), with the weight and the count masked on the
        device, so a skipped step costs no host sync; integer buffers are copied, not averaged."""
        a = self.averaged
        keep = ~bad if bad is not None else torch.ones((), dtype=torch.bool, device=a.n_averaged.device)
        mine = [*a.module.parameters(), *a.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        weight = torch.where(a.n_averaged == 0, 1.0, 1.0 - self.decay) * keep  # the first update copies, as AveragedModel
        by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for e, m in zip(mine, theirs):
            if e.is_floating_point():
                pair = by_dtype.setdefault(e.dtype, ([], []))
                pair[0].append(e)
                pair[1].append(m.detach())
            else:  # BatchNorm's num_batches_tracked: copied where the step counts
                e.copy_(torch.where(keep, m, e))
        for dtype, (ema, cur) in by_dtype.items():
            torch._foreach_lerp_(ema, cur, weight.to(dtype))
        a.n_averaged += keep.long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Averaged weights and ``n_averaged``, contiguous (safetensors refuses strided views)."""
        return {k: v.detach().contiguous() for k, v in self.averaged.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)


def find_ema_state(folder: Path) -> dict[str, torch.Tensor] | None:
    """The EMA weights a checkpoint holds (the ``custom_checkpoint_N.pkl`` with ``n_averaged``), as a
    state dict of the model (``module.`` prefix removed); None when the run had no EMA."""
    for path in sorted(Path(folder).glob("custom_checkpoint_*.pkl")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001, S112 - a schedule's state may not load weights-only; it is not the EMA
            continue
        if isinstance(state, dict) and "n_averaged" in state:
            return {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
    return None
