"""Shared fixtures: tiny synthetic shards written with the project's own writer."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service() -> None:
    """An in-process ``wandb.init`` (any test that trains in-process while WANDB_MODE=offline is exported)
    puts WANDB_SERVICE into os.environ. Every later subprocess would then attach to the pytest process's
    wandb-core, where a run killed by a test keeps its ID "in use" and its resume fails. Each test starts
    without one, as a user's shell would."""
    os.environ.pop("WANDB_SERVICE", None)


def make_images(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: a bright square whose position and size depend on the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n).astype(np.int64)
    x = (rng.random((n, channels, size, size)) * 40).astype(np.uint8)
    for c in range(4):
        idx = labels == c
        lo, hi = size // 8 + c * size // 8, size // 2 + c * size // 8
        x[idx, :, lo:hi, size // 4: size // 4 + (c + 2) * size // 10] = 220
    return x, labels


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 train / 64 val / 64 test 1x28x28 images in 4 classes, blocks of 32 (so ranks split blocks)."""
    from aedist.data import write_shards

    out = tmp_path_factory.mktemp("shards") / "tiny"
    write_shards(out, {"train": make_images(256, seed=1), "val": make_images(64, seed=2), "test": make_images(64, seed=3)},
                 class_names=["a", "b", "c", "d"], samples_per_block=32, blocks_per_shard=4, seed=0)
    return out


def _run_py(args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def run_py() -> Callable[..., subprocess.CompletedProcess]:
    """Run a Python entry point of the project as a user would (W&B offline), capturing its output:
    ``run_py(["launch/train.py", "--config", cfg], env={...})``."""
    return _run_py


ACCEL_2 = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.fixture
def train(run_py: Callable[..., subprocess.CompletedProcess]) -> Callable[..., subprocess.CompletedProcess]:
    """``train(cfg, *overrides, procs=1|2, env=...)``: launch/train.py as a user runs it (2 = two gloo processes)."""

    def run(cfg: Path, *extra: str, procs: int = 1, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        args = ([*ACCEL_2] if procs == 2 else []) + ["launch/train.py", "--config", str(cfg), *extra]
        return run_py(args, env=env)

    return run


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards to serve over HTTP: 8 train shards of 24 samples (3x6x6, labels = unique ids) and one test shard."""
    from aedist.data import write_shards

    out = tmp_path_factory.mktemp("shards") / "s"
    x = np.random.default_rng(0).integers(0, 256, (192, 3, 6, 6), dtype=np.uint8)
    write_shards(out, {"train": (x, np.arange(192)), "test": (x[:10], np.arange(10))}, ["a"], samples_per_block=8, blocks_per_shard=3)
    return out


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 with exactly one ``error:`` line holding ``words``, and no traceback: how a user mistake ends."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]
