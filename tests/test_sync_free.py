"""The GPU path checked on CPU: no host-device sync inside a step, the exact NaN guard decided on the
device, stop signals agreed at sync points, the configurable preemption signal, throughput accounting."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from test_engine import RunFn, _start, _wait_for, write_config

from aedist.config import load_config
from aedist.engine import Trainer

# What makes the host wait for the device: every way a tensor's value reaches Python.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[str]]:
    seen: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def spy(name: str):  # noqa: ANN202 - a wrapper with the original's signature
        def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            seen.append(name)
            return saved[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("extra", [
    [],
    ["optim.grad_clip=1.0", "corruption=[{rotate: {max_degrees: 30}}]", "train.grad_accum=2", "train.ema_decay=0.9"],
    ["objective.name=lpips_gan", "objective.params={perceptual_weight: 0.0, disc_start: 0, disc_layers: 2, disc_ndf: 8}", "loss.name=l1"],
])
def test_no_host_sync_inside_a_step_between_sync_points(tmp_path: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch,
                                                        extra: list[str]) -> None:
    cfg = load_config(None, [f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "run.name=sync", "data.batch_size=16",
                             "model.channels=[8, 16]", "model.latent_dim=4", "train.epochs=1", "log.every=1000", "log.wandb=disabled",
                             "log.probe_size=8", "eval.knn_train=16", "train.mixed_precision=no", *extra])
    trainer = Trainer(cfg)
    reads_per_step: list[int] = []
    syncs: list[int] = []
    step, sync = trainer._step, trainer._sync

    def counted_step(*args: object, **kwargs: object) -> object:
        with count_host_reads() as seen:
            out = step(*args, **kwargs)
        reads_per_step.append(len(seen))
        return out

    def counted_sync() -> tuple[bool, bool]:
        syncs.append(trainer.state.step)
        return sync()

    monkeypatch.setattr(trainer, "_step", counted_step)
    monkeypatch.setattr(trainer, "_sync", counted_sync)
    assert trainer.device_skip  # fused Adam on CPU: the skip is the kernel's
    assert trainer.fit() == 0
    steps = 256 // 16
    assert reads_per_step == [0] * steps
    assert syncs == [1, steps]  # log.every=1000: the start's first step (signals from start-up) and the epoch's last


def test_fallback_without_fused_kernels_reads_the_flag_every_step(tmp_path: Path, tiny_shards: Path) -> None:
    cfg = load_config(None, [f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "run.name=unfused", "data.batch_size=64",
                             "model.channels=[8, 16]", "model.latent_dim=4", "train.epochs=1", "log.wandb=disabled",
                             "log.probe_size=8", "eval.knn_train=16", "optim.fused=false"])
    trainer = Trainer(cfg)
    assert not trainer.device_skip
    assert trainer.fit() == 0


def _steps_applied(run: Path, ckpt: str) -> tuple[int, int]:
    """(Adam's step count, the EMA's update count) of a checkpoint: how many steps changed the weights."""
    folder = run / "checkpoints" / ckpt
    adam = torch.load(folder / "optimizer.bin", weights_only=True)
    ema = next(s for p in sorted(folder.glob("custom_checkpoint_*.pkl")) if "n_averaged" in (s := torch.load(p, weights_only=True)))
    return {int(v["step"]) for v in adam["state"].values()}.pop(), int(ema["n_averaged"])


@pytest.mark.slow
def test_nan_on_one_rank_between_syncs_is_applied_by_no_rank(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    # Syncs every 4 steps only; rank 1's loss is NaN at step 6: the device decides, the host learns at step 8.
    cfg = write_config(tmp_path, tiny_shards, "nan", data={"batch_size": 32},
                       train={"epochs": 2, "max_bad_steps": 1, "checkpoint_every": 4, "keep_last": 10, "ema_decay": 0.9, "sync_every": 4},
                       log={"wandb": "disabled", "every": 4, "probe_size": 16})
    proc = train(cfg, procs=2, env={"AEDIST_INJECT_NAN": "1:6"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "non-finite loss at step 6 (1 step(s) skipped since the last check, 1 of 1 allowed)" in out
    run = tmp_path / "runs/nan"
    assert _steps_applied(run, "step-4") == (4, 4)
    assert _steps_applied(run, "step-8") == (7, 7)  # step 6 changed no weight, moment or count, on either rank
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows if r.get("step") in (4, 8) and "train/skipped_steps" in r] == [0, 1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["step"] == 16


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signals_are_agreed_at_sync_points(tmp_path: Path, tiny_shards: Path, train: RunFn, sig: signal.Signals) -> None:
    every = 5
    cfg = write_config(tmp_path, tiny_shards, "stop", data={"batch_size": 16}, model={"channels": [16, 32, 64], "latent_dim": 4},
                       train={"epochs": 12, "checkpoint_every": 10, "eval_every": 1000, "sync_every": every},
                       log={"wandb": "disabled", "every": 1000, "figures_every": 1000, "probe_size": 16})
    run = tmp_path / "runs/stop"
    proc = _start(cfg)
    _wait_for(run / "checkpoints/step-10/COMPLETE", proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 75
    saved = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert saved % every == 0 and saved > 10  # the stop waited for a sync point, at most sync_every steps
    again = train(cfg)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == [saved]


@pytest.mark.slow
def test_configured_preempt_signal_fires_after_the_process_group_is_up(tmp_path: Path, tiny_shards: Path) -> None:
    import os
    import subprocess
    import sys

    from conftest import ACCEL_2, ROOT

    cfg = write_config(tmp_path, tiny_shards, "usr2", data={"batch_size": 8}, model={"channels": [16, 32, 64], "latent_dim": 4},
                       train={"epochs": 40, "checkpoint_every": 8, "eval_every": 1000, "preempt_signal": "USR2"},
                       log={"wandb": "disabled", "every": 4, "figures_every": 1000, "probe_size": 16})
    # The launcher ignores USR2 (as slurm/train.sbatch's does); its process group, the workers, get it.
    proc = subprocess.Popen(["bash", "-c", f'trap "" USR2; exec {sys.executable} {" ".join(ACCEL_2)} launch/train.py --config {cfg}'],
                            cwd=ROOT, env={**os.environ, "WANDB_SILENT": "true"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    run = tmp_path / "runs/usr2"
    _wait_for(run / "checkpoints/step-8/COMPLETE", proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    for pid in workers:  # as slurmstepd signals every process of the step
        os.kill(int(pid), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=180)
    assert "preempted: saved step" in out, out[-3000:]
    summary_missing = not (run / "summary.json").exists()
    assert summary_missing and max(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*")) > 8


def test_throughput_is_logged_and_summarised(tmp_path: Path, tiny_shards: Path) -> None:
    from aedist.models import build_model
    from aedist.throughput import count_model_flops, flops_per_image

    cfg = load_config(None, [f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "run.name=tp", "data.batch_size=64",
                             "model.channels=[8, 16]", "model.latent_dim=4", "train.epochs=1", "log.every=2", "log.wandb=disabled",
                             "log.probe_size=8", "eval.knn_train=16"])
    trainer = Trainer(cfg)
    assert trainer.fit() == 0
    model = build_model(cfg.model)
    x = torch.rand(3, 1, 28, 28)
    # The meta-device count equals a real forward + backward counted by torch's FlopCounterMode.
    assert trainer.flops_per_input == count_model_flops(model, (1, 28, 28)) == flops_per_image(
        lambda inp: model(inp).recon.float().square().mean(), x)
    rows = [json.loads(line) for line in (tmp_path / "tp/metrics.jsonl").read_text().splitlines() if "train/tflops" in line]
    assert rows and all(r["train/tflops"] > 0 and 0 <= r["train/data_wait_share"] < 1 and r["train/peak_mem_gb"] > 0 for r in rows)
    assert all("train/mfu" not in r for r in rows)  # a CPU has no peak in the table: no MFU
    summary = json.loads((tmp_path / "tp/summary.json").read_text())
    assert summary["flops_per_image"] == trainer.flops_per_input and summary["tflops"] > 0 and "mfu" not in summary


# ---------------------------------------------------------------- one-batch-ahead prefetch


def test_prefetch_yields_the_same_batches_positions_and_errors(tiny_shards: Path, tmp_path: Path) -> None:
    from aedist.data import load_batches
    from aedist.errors import UserError

    for rank in (0, 1):
        plain = load_batches(tiny_shards, "train", 24, rank, 2, seed=5, epoch=1, return_ids=True)
        ahead = load_batches(tiny_shards, "train", 24, rank, 2, seed=5, epoch=1, return_ids=True, prefetch=True)
        for k, (a, b) in enumerate(zip(plain, ahead)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
            assert ahead.position == plain.position  # counts batches handed out, not read ahead
            if k == 2:
                break
        resumed = load_batches(tiny_shards, "train", 24, rank, 2, seed=5, epoch=1, position=ahead.position.to_dict(), prefetch=True)
        rest = list(plain)
        assert len(rest) == len(resumed) and all(torch.equal(a[0], b[0]) for a, b in zip(rest, resumed))
        ahead.close()
    # A damaged shard surfaces at the batch that reads it, as without prefetch.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_shards, bad)
    shard = sorted(bad.glob("train-*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[:-700])
    with pytest.raises(UserError, match=shard.name):
        list(load_batches(bad, "train", 32, shuffle=False, prefetch=True))


@pytest.mark.slow
def test_prefetch_kill_9_resume_equals_the_uninterrupted_run_without_it(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    from test_engine import _slow_resumable, kill_and_resume, max_diff, weights

    ref = _slow_resumable(tmp_path, tiny_shards, "ref")
    assert train(ref).returncode == 0
    cfg, run = _slow_resumable(tmp_path, tiny_shards, "ahead"), tmp_path / "runs/ahead"
    sections = yaml.safe_load(cfg.read_text())
    sections["data"]["prefetch"] = True  # the reference ran without it: the same samples in the same order
    cfg.write_text(yaml.safe_dump(sections))
    kill_and_resume(train, cfg, run, 40)
    assert json.loads((run / "summary.json").read_text())["resumed_from"][0] >= 40
    assert max_diff(weights(run), weights(tmp_path / "runs/ref")) <= 1e-6


@pytest.mark.slow
def test_prefetch_elastic_2_to_1_uses_every_sample_once(tmp_path: Path, tiny_shards: Path, run_py: RunFn) -> None:
    import numpy as np
    from test_elastic import _config, _consumed, _launch

    cfg, dump = _config(tmp_path, tiny_shards, "elastic"), tmp_path / "ids"
    dump.mkdir()
    assert _launch(run_py, cfg, 2, "train.max_steps=2", "data.prefetch=true", dump=dump).returncode == 0
    second = _launch(run_py, cfg, 1, "train.max_steps=0", "data.prefetch=true", dump=dump)
    assert second.returncode == 0, second.stderr[-2000:]
    epoch0, epoch1 = _consumed(dump, 0), _consumed(dump, 1)
    assert len(np.unique(epoch0)) == len(epoch0) and 0 <= 256 - len(epoch0) < 256 % 48 + 48
    assert len(np.unique(epoch1)) == len(epoch1) == 256 // 48 * 48
