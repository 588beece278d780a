"""Optimizer and learning-rate schedule from the config.

The schedule is stepped by the engine itself (once per optimizer step, or once per epoch on the
validation loss for ReduceLROnPlateau) rather than handed to ``accelerator.prepare``: Accelerate
would step a prepared scheduler once per process, and here ``data.batch_size`` is already global.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aedist.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over the trainable parameters; fused kernels only where CUDA runs them."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=(cfg.fused and on_cuda) or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """None, ReduceLROnPlateau (stepped per epoch on val loss), or linear warmup then cosine (per step)."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    if cfg.scheduler == "cosine":
        warmup = cfg.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None
