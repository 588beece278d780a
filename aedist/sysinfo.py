"""Facts about this process that runs and benchmarks both record."""

from __future__ import annotations

import os
import platform
import resource

import torch

from aedist.precision import cpu_bf16_features


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mb() -> float:
    """This process's own peak RSS in MiB from /proc (ru_maxrss would include what a fork inherited)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def device_name(device: str = "cpu") -> str:
    """What a speed figure was measured on: the GPU's name, or the CPU model with its usable cores and
    native-bf16 features, e.g. "Intel(R) Xeon(R) Processor, 2 cores, amx_bf16 avx512_bf16". Runs and
    benchmarks record it because the CPU differs between machines of one kind."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        model = platform.processor() or model
    features = " ".join(sorted(cpu_bf16_features())) or "no native bf16"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # Linux: what this process may use
    return f"{model}, {cores} cores, {features}"
