"""Resolve the ``auto`` speed settings (mixed precision, channels_last, compile) for this machine.

The engine calls, in this order (see each function for its rule and the measurement behind it):

    mp = resolve_mixed_precision(cfg.train.mixed_precision, device)            # before Accelerator(...)
    cl = resolve_channels_last(cfg.train.channels_last, model, device, mp)     # after build_model
    on = resolve_compile(cfg.train.compile, debug=debug, total_steps=n, device=device)
    model, opt = accelerator.prepare(model, opt)                               # never a compiled module
    forward = compile_model(model, device) if on else model                   # the train step's handle
    note_resolved(run_dir / "config.yaml", device, world, mp, cl, on)          # after save_config
    ...each micro-batch: begin_step(on, device); out = forward(inputs)

Everything here is a pure function of its arguments plus two cached capability probes
(:func:`cpu_bf16_features`, :func:`compiler_available`), which the tests replace.

Measurements quoted below: one training step of a seed config (``prepare_batch`` with its
corruption, forward, loss, backward, optimizer step) on this machine kind, an AMD EPYC with
AVX-512 BF16 but no AMX, 2 cores, timed single-threaded in thread CPU time (the machine is shared,
and wall time under load says more about the neighbours than the kernels); medians of 8 steps,
interleaved round-robin. ``python launch/benchmark.py train`` measures whole runs on 2 threads.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# CPU features that run bf16 matmuls/convs natively: AMX tiles and AVX-512 BF16 on x86, BF16
# (incl. SVE) on Arm. Without them oneDNN emulates bf16 through fp32 and casts. Measured here with
# oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, the kernels an AVX2-only CPU gets), bf16 autocast
# made a step 8-12x slower than fp32 (seed 000 rotated, batch 384: 2402 ms vs 208 ms; seed 003:
# 1526 ms vs 177 ms), while with AVX-512 BF16 it made it 1.5-1.8x faster (below): so detect, never assume.
# How much of that gain a model sees depends on its layer shapes. AVX-512 BF16 without AMX doubles
# the multiply rate at best; per layer of seed 000 (batch 64, forward + backward incl. input grad,
# 200 reps, 2 threads, ms) fp32 / fp32+channels_last / bf16 / bf16+channels_last:
#   ConvTranspose2d 128->64, 4->7 px   4.30 / 3.58 / 6.00 / 5.74   (bf16 slower)
#   ConvTranspose2d 64->32, 7->14 px   5.54 / 3.17 / 4.77 / 4.66
#   Conv2d 64->128, 7->4 px            3.09 / 2.94 / 3.18 / 3.05   (no gain)
#   Conv2d 32->64, 14->7 px            5.05 / 3.72 / 4.30 / 3.67
# so the whole seed-000 step gains 1.16-1.34x (the bare loop; running its transposed convs in fp32
# gained nothing once the casts were paid), while the STL10 model's 96 px maps gain 2.5x.
BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")

# Compile's break-even in optimizer steps. Inductor's first step (codegen, g++ on CPU, Triton on
# CUDA) costs seconds to a minute: here 55 s (seed 000, first compile into an empty cache), 10 s
# (seed 000 rotated) and 14 s (STL10 model), 1.2-1.7 s when its on-disk cache already holds the
# code (a resumed run); ~19 s on the AMX machine, where steady compiled steps gained ~1.2x.
# With a ~150 ms eager step, 1.2x saves ~25 ms a step: a 19-55 s warm-up is repaid after 760-2200
# steps. The seed schedules (thousands of steps: 51 epochs x 375 for seed 000) pass 2000;
# configs/debug.yaml (32 steps) and the tests do not.
COMPILE_MIN_STEPS = 2000

# Devices where ``auto`` compiles (long runs only). CUDA: the seed models are tiny, so their steps
# are bound by kernel launches, which reduce-overhead's CUDA graphs remove (not measured here: no
# GPU was lent). Not CPU: measured here at the precision ``auto`` picks (bf16 + channels_last),
# steady compiled steps vs eager, 2 threads, wall clock (docs/bench/train.txt, best of 3 rounds):
# seed 000 0.94x, seed 000 rotated 1.03x, STL10 model 1.12x (an earlier run: seed 000 0.67-0.88x,
# rotated 0.82x); single-threaded, CPU time: 1.00x, 1.02x, seed 003 1.08x. Inductor leaves the
# convolutions (nearly all of a step) to the same oneDNN kernels and only fuses the cheap pointwise
# ops around them, so on CPU it is a wash for the small seed models and a ~10% gain for the STL10
# one: not worth a default. ``train.compile=true`` still compiles on CPU.
COMPILE_AUTO_DEVICES = ("cuda",)


@functools.cache
def cpu_bf16_features() -> frozenset[str]:
    """The native-bf16 features this CPU reports, from torch's own cpuinfo query
    (``torch.cpu.get_capabilities()``, torch >= 2.9) or, failing that, /proc/cpuinfo's flags."""
    caps: Mapping[str, Any] = {}
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = get()
        except RuntimeError:  # cpuinfo could not initialise (rare sandboxes): fall through to /proc
            caps = {}
    if caps:
        return frozenset(f for f in BF16_CPU_FEATURES if caps.get(f) is True)
    try:
        with open("/proc/cpuinfo") as fh:
            flags = {w for line in fh if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return frozenset()
    return frozenset(f for f in BF16_CPU_FEATURES if f in flags)


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AMX, AVX-512 BF16, or Arm BF16)."""
    return bool(cpu_bf16_features())


def cuda_supports_bf16() -> bool:
    """Whether the current CUDA device has bf16 tensor cores (compute capability >= 8.0). torch's
    default also counts pre-Ampere emulation, which is slower than fp32, so it is switched off."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where ``device`` runs it natively, else ``no``; ``no``/``bf16``/``fp16`` pass through.

    fp16 is never chosen automatically: it needs a loss scaler and overflows where bf16 does not,
    and every GPU with fast fp16 but no bf16 (pre-Ampere) is also where fp32 is the safe default.
    """
    if setting != "auto":
        return setting
    native = cuda_supports_bf16() if device.type == "cuda" else device.type == "cpu" and cpu_supports_bf16()
    return "bf16" if native else "no"


def has_conv(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a 2-D (transposed) convolution, the layers memory format changes."""
    return any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())


def resolve_channels_last(setting: str | bool, model: nn.Module, device: torch.device, mixed_precision: str = "no") -> bool:
    """``auto`` -> on for conv models on CPU (any precision) and on CUDA under bf16/fp16; an explicit bool passes through.

    On CPU, channels_last pays in fp32 too: oneDNN's conv kernels work on NHWC-blocked data, so an
    NCHW model pays a reorder around every conv. Measured here, one step, channels_last vs NCHW:
    fp32 1.06x (seed 000 baseline, batch 64), 1.15x (seed 000 rotated, 384), 1.17x (seed 003, 128),
    1.23x (STL10 model, 64); under bf16 0.96x, 1.03x, 1.28x, 1.37x, and bf16 + channels_last vs
    fp32 NCHW 1.30x, 1.58x, 2.02x, 2.45x. So fp32 + channels_last on CPU (what ``auto`` gives on a
    CPU without native bf16) is intended, not an oversight. On CUDA the NHWC kernels are the
    tensor-core path for 16-bit types; fp32 on CUDA keeps NCHW (cuDNN's tuned default; unmeasured,
    no GPU was available). Models without convolutions (MLPs) gain nothing and stay NCHW.
    """
    if setting != "auto":
        return bool(setting)
    if not has_conv(model):
        return False
    return device.type == "cpu" or mixed_precision in ("bf16", "fp16")


@functools.cache
def compiler_available(device_type: str) -> bool:
    """Whether torch.compile's default backend can generate code here: Triton for CUDA, a C++
    compiler for CPU (Inductor writes and builds C++ on CPU)."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    import os

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def resolve_compile(setting: str | bool, *, debug: bool, total_steps: int, device: torch.device | None = None) -> bool:
    """``auto`` -> on for a device of :data:`COMPILE_AUTO_DEVICES` (CUDA) when the run is long enough
    to repay the warm-up (:data:`COMPILE_MIN_STEPS`) and the backend's compiler exists; off on CPU,
    for ``--debug`` and for short runs (tests). An explicit bool passes through.
    ``device=None`` means CPU (so a caller that forgets it never compiles by surprise)."""
    if setting != "auto":
        return bool(setting)
    kind = device.type if device is not None else "cpu"
    if debug or total_steps < COMPILE_MIN_STEPS or kind not in COMPILE_AUTO_DEVICES:
        return False
    return compiler_available(kind)


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The training step's compiled handle on ``model`` (the module ``accelerator.prepare`` returned).

    It shares ``model``'s parameters, so checkpoints, evaluation and ``unwrap_model`` keep using
    ``model`` itself: state-dict keys carry no ``_orig_mod.`` prefix (a checkpoint resumes with
    compile on or off) and eval's other batch sizes and no-grad mode never trigger recompiles.
    ``dynamic=False``: the train batch shape is fixed (drop_last), so one graph serves every epoch.
    On CUDA ``reduce-overhead`` replays the forward and backward as CUDA graphs, which removes the
    kernel-launch cost that dominates the seeds' tiny models; on CPU the default Inductor mode.
    """
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(model, mode=mode, dynamic=False)


def begin_step(compiled: bool, device: torch.device) -> None:
    """Call before each compiled forward: tells CUDA-graph trees a new iteration starts, so the
    previous step's graph outputs may be overwritten (without it, holding a tensor from the last
    step across the next replay raises). A no-op when not compiled or not on CUDA."""
    if compiled and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def describe(mixed_precision: str, channels_last: bool, compiled: bool) -> str:
    """The resolved settings as the overrides that would force them: ``train.mixed_precision=bf16 ...``."""
    return (f"train.mixed_precision={mixed_precision} train.channels_last={str(channels_last).lower()} "
            f"train.compile={str(compiled).lower()}")


def note_resolved(config_yaml: str | Path, device: torch.device, world: int, mixed_precision: str, channels_last: bool,
                  compiled: bool) -> None:
    """Append what ``auto`` resolved to as a YAML comment at the end of the run's ``config.yaml``.

    A comment, not the values themselves: config.yaml keeps the settings as asked (``auto``), so
    a resume compares like with like (no "changed 'bf16' -> 'auto'" on every restart) and a copy
    of it run on a CPU without native bf16 does not force bf16 there (8-12x slower, see
    :data:`BF16_CPU_FEATURES`). summary.json holds the same three values as fields.
    """
    with open(config_yaml, "a") as fh:
        fh.write(f"# resolved on {device.type} x{world}: {describe(mixed_precision, channels_last, compiled)}\n")
