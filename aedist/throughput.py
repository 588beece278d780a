"""Throughput accounting as torchtitan logs it: model FLOPs per image (counted once), achieved TFLOP/s,
MFU against the device's peak, the share of time spent waiting for data, and peak memory.

    flops = flops_per_image(model, forward_backward, example)   # once at start, with torch.utils.flop_counter
    peak = peak_flops(device, "bf16")                           # None on CPUs and unknown GPUs: no MFU printed

FLOPs are the model's forward + backward (the training step's arithmetic, 3x the forward for the usual
layers); an objective's extra networks (a discriminator, LPIPS) are not counted, so MFU is the model's
share, as papers report it. Peaks are dense (no sparsity) tensor-core figures from NVIDIA's data sheets.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from aedist.sysinfo import vm_hwm_mb

# Dense peak FLOP/s by device name fragment: (bf16/fp16 tensor core, fp32 / tf32-off). SXM parts; the
# PCIe/NVL variants run lower clocks, so their MFU reads a little low rather than flatteringly high.
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for ``precision`` ('bf16'/'fp16' or 'no' = fp32), or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (half, single) in PEAK_FLOPS.items():
        if fragment in name:
            return half if precision in ("bf16", "fp16") else single
    return None


def flops_per_image(step: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> float:
    """FLOPs of one forward + backward of ``step`` (which returns a scalar loss) per image of ``example``
    ``[B, C, H, W]``, counted by ``torch.utils.flop_counter`` (matmuls and convolutions: what MFU counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(example).backward()
    return counter.get_total_flops() / example.shape[0]


def count_model_flops(model: nn.Module, shape: tuple[int, ...], batch: int = 2) -> float:
    """FLOPs per image of ``model``'s training step (forward, a mean-squared loss, backward) on images of
    ``shape`` ``[C, H, W]``, counted on a copy on the meta device: no arithmetic runs, no RNG draw, no
    weight, gradient or BatchNorm statistic of the real model changes (exact resume is untouched)."""
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(batch, *shape, device="meta")
    return flops_per_image(lambda inp: meta(inp).recon.float().square().mean(), x)


def peak_memory_gb(device: torch.device) -> float:
    """Peak device memory allocated (CUDA), else this process's peak resident set, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return vm_hwm_mb() / 1024
