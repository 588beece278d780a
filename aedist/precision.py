"""Resolve the ``auto`` speed settings (mixed precision, channels_last, compile) for this machine."""

from __future__ import annotations

import functools

import torch
from torch import nn

COMPILE_MIN_STEPS = 2000  # below this, torch.compile's warm-up costs more than it saves


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX or AVX-512 BF16), read from /proc/cpuinfo."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device runs it natively, else no; other settings pass through."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_supports_bf16() else "no"


def resolve_channels_last(setting: str | bool, model: nn.Module, device: torch.device, mixed_precision: str) -> bool:
    """``auto`` -> on for conv models under bf16 or on CUDA, where it is the fast layout."""
    if setting != "auto":
        return bool(setting)
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return has_conv and (device.type == "cuda" or mixed_precision == "bf16")


def resolve_compile(setting: str | bool, *, debug: bool, total_steps: int) -> bool:
    """``auto`` -> on for runs long enough to repay the warm-up; never for --debug runs."""
    if setting != "auto":
        return bool(setting)
    return not debug and total_steps >= COMPILE_MIN_STEPS


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile with static shapes; on CUDA with CUDA graphs (launch-bound tiny models)."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
