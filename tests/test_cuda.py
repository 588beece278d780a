"""CUDA-only checks (``pytest -m cuda``; skipped without a GPU): what ``auto`` resolves to, compiled
steps with CUDA graphs, pinned non-blocking copies on a side stream, and no host-device sync between
log intervals, enforced by ``torch.cuda.set_sync_debug_mode("error")``. ``launch/gpu_check.sh`` runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aedist.config import load_config
from aedist.engine import Trainer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _config(tmp: Path, shards: Path, name: str, *extra: str):  # noqa: ANN202 - a Config
    return load_config(None, [f"data.shards={shards}", f"run.dir={tmp}", f"run.name={name}", "data.batch_size=32",
                              "model.channels=[16, 32]", "model.latent_dim=8", "train.epochs=2", "log.wandb=disabled",
                              "log.probe_size=8", "eval.knn_train=32", *extra])


def test_auto_settings_resolve_to_the_fast_path(tmp_path: Path, tiny_shards: Path) -> None:
    trainer = Trainer(_config(tmp_path, tiny_shards, "auto"))
    bf16 = torch.cuda.is_bf16_supported()
    assert trainer.mixed_precision == ("bf16" if bf16 else "no")
    assert trainer.channels_last == bf16
    assert trainer.device_skip and trainer.prefetch
    assert trainer.fit() == 0
    summary = json.loads((tmp_path / "auto/summary.json").read_text())
    assert summary["tflops"] > 0 and summary["peak_mem_gb"] > 0


def test_no_host_sync_between_log_intervals(tmp_path: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # corruption, clipping, EMA and the GAN objective on: every part of the step must stay on the device
    cfg = _config(tmp_path, tiny_shards, "nosync", "log.every=1000", "optim.grad_clip=1.0", "train.ema_decay=0.99",
                  "corruption=[{rotate: {max_degrees: 30}}]", "objective.name=lpips_gan", "loss.name=l1",
                  "objective.params={perceptual_weight: 0.0, disc_start: 2, disc_layers: 2, disc_ndf: 8}")
    trainer = Trainer(cfg)
    step = trainer._step

    def strict(*args: object, **kwargs: object) -> object:
        torch.cuda.set_sync_debug_mode("error")  # any implicit sync inside raises
        try:
            return step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(trainer, "_step", strict)
    assert trainer.fit() == 0


def test_compiled_step_with_cuda_graphs_trains(tmp_path: Path, tiny_shards: Path) -> None:
    trainer = Trainer(_config(tmp_path, tiny_shards, "compiled", "train.compile=true", "train.epochs=3"))
    assert trainer.compiled
    assert trainer.fit() == 0
    summary = json.loads((tmp_path / "compiled/summary.json").read_text())
    assert summary["compile"] and summary["val/loss"] < 0.2


def test_prefetched_batches_are_pinned_copies_on_a_side_stream(tiny_shards: Path) -> None:
    from aedist.data import load_batches

    dev = torch.device("cuda")
    plain = list(load_batches(tiny_shards, "train", 32, device="cpu", seed=1))
    ahead = load_batches(tiny_shards, "train", 32, device=dev, seed=1, prefetch=True)
    for (x, y), (cx, cy) in zip(plain, ahead):
        assert cx.is_cuda and torch.equal(cx.cpu(), x) and torch.equal(cy.cpu(), y)
    assert ahead._batches._side is not None and ahead._batches._side != torch.cuda.current_stream()
