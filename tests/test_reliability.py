"""Hostile-user cases (issue 12): each reproduces a failure that once gave a silent wrong result, a
lost epoch or a traceback, and asserts the promised behaviour instead."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aedist.checkpoint import CheckpointError
from aedist.config import load_config
from aedist.errors import UserError
from aedist.resume import RunLock

ROOT = Path(__file__).resolve().parents[1]


def overrides(shards: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run.dir={tmp}", f"run.name={name}", "data.batch_size=32", "train.epochs=2",
            "log.wandb=disabled", "train.mixed_precision=no", "train.compile=false", "train.cpu=true",
            "train.checkpoint_every=2", "train.keep_last=5", *extra]


def fit(shards: Path, tmp: Path, name: str, *extra: str):
    from aedist.engine import Trainer

    trainer = Trainer(load_config(None, overrides(shards, tmp, name, *extra)))
    code = trainer.fit()
    return trainer, code


def test_changed_lr_on_resume_takes_effect_and_is_recorded(tmp_path: Path, tiny_shards: Path, capsys: pytest.CaptureFixture) -> None:
    fit(tiny_shards, tmp_path, "lr", "train.max_steps=2", "optim.lr=0.01")
    trainer, code = fit(tiny_shards, tmp_path, "lr", "train.max_steps=4", "optim.lr=0.002", "optim.weight_decay=0.1")
    assert code == 0 and trainer.state.resumed_from == [2]
    assert trainer.optimizer.param_groups[0]["lr"] == 0.002 and trainer.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert "resume: optim.lr changed 0.01 -> 0.002" in capsys.readouterr().out
    history = [json.loads(line) for line in (tmp_path / "lr" / "resumes.jsonl").read_text().splitlines()]
    assert history[-1]["changed"]["optim.lr"] == [0.01, 0.002]
    assert load_config(tmp_path / "lr" / "config.yaml").optim.lr == 0.002  # config.yaml holds what is used


def test_change_that_makes_another_experiment_is_refused(tmp_path: Path, tiny_shards: Path) -> None:
    fit(tiny_shards, tmp_path, "fixed", "train.max_steps=2")
    with pytest.raises(UserError, match="loss.name changed from 'mse' to 'bce'.*cannot change"):
        fit(tiny_shards, tmp_path, "fixed", "train.max_steps=4", "loss.name=bce")


def test_another_runs_checkpoint_starts_a_new_wandb_run(tmp_path: Path, tiny_shards: Path) -> None:
    first, _ = fit(tiny_shards, tmp_path, "a", "train.max_steps=2")
    source = tmp_path / "a" / "checkpoints" / "step-2"
    second, _ = fit(tiny_shards, tmp_path, "b", "train.max_steps=4", f"train.resume={source}")
    assert second.state.wandb_run_id != first.state.wandb_run_id
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["started_from"] == str(source) and summary["step"] == 4


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, tiny_shards: Path, capsys: pytest.CaptureFixture) -> None:
    fit(tiny_shards, tmp_path, "dmg", "train.max_steps=4")
    ckpts = tmp_path / "dmg" / "checkpoints"
    (ckpts / "step-4" / "model.safetensors").write_bytes(b"garbage")
    trainer, code = fit(tiny_shards, tmp_path, "dmg", "train.max_steps=6")
    assert code == 0 and trainer.state.resumed_from == [2]
    assert f"warning: checkpoint {ckpts / 'step-4'} is damaged" in capsys.readouterr().out
    for folder in ckpts.glob("step-*"):
        (folder / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="no usable checkpoint .* damaged"):
        fit(tiny_shards, tmp_path, "dmg", "train.max_steps=8")


def test_resume_path_that_is_no_checkpoint_says_so(tmp_path: Path, tiny_shards: Path) -> None:
    with pytest.raises(UserError, match="is not a checkpoint folder"):
        fit(tiny_shards, tmp_path, "etc", f"train.resume={tmp_path}")


def test_full_disk_while_checkpointing_cleans_up_and_keeps_older(tmp_path: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator

    fit(tiny_shards, tmp_path, "full", "train.max_steps=2")
    real = Accelerator.save_state

    def full(self: Accelerator, output_dir: str, **kw: object) -> None:
        real(self, output_dir, **kw)  # writes part of the checkpoint, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", output_dir)

    monkeypatch.setattr(Accelerator, "save_state", full)
    with pytest.raises(CheckpointError, match="No space left on device.*older checkpoints .* are kept"):
        fit(tiny_shards, tmp_path, "full", "train.max_steps=4")
    ckpts = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step-2"]  # no .tmp-step-4 left behind


def test_run_folder_lock_refuses_a_second_live_run_but_not_a_dead_ones(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "run")
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
        RunLock(tmp_path / "run")
    lock.release()
    RunLock(tmp_path / "run").release()
    # A holder killed with SIGKILL (a preempted job's predecessor) leaves no stale lock behind.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from aedist.resume import RunLock; "
                               f"lock = RunLock(Path({str(tmp_path / 'run')!r})); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError):
        RunLock(tmp_path / "run")
    holder.kill()
    holder.wait()
    RunLock(tmp_path / "run").release()


@pytest.mark.parametrize("override, words", [
    ("train=3", "'train' is a section"), ("run.name=../x", "plain folder name"), ("run.name=/abs", "plain folder name"),
    ("run.name=", "plain folder name"),
])
def test_bad_overrides_are_refused(override: str, words: str) -> None:
    with pytest.raises(UserError, match=words):
        load_config("configs/debug.yaml", ["train.max_steps=4", override])


def _config_file(tmp: Path, shards: Path, name: str, *extra: str) -> Path:
    import yaml

    data: dict = {}
    for item in overrides(shards, tmp, name, *extra):
        key, value = item.split("=", 1)
        section, field = key.split(".")
        data.setdefault(section, {})[field] = yaml.safe_load(value)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_signal_in_the_first_second_saves_and_exits_with_its_code(tmp_path: Path, tiny_shards: Path, sig: int, code: int) -> None:
    cfg = _config_file(tmp_path, tiny_shards, "sig", "train.epochs=50")
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    time.sleep(0.5)  # still importing torch: before any trainer exists
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    assert "saved step 1" in out and (tmp_path / "sig" / "checkpoints" / "step-1" / "COMPLETE").exists()


@pytest.mark.slow
def test_online_wandb_without_login_is_one_line(tmp_path: Path, tiny_shards: Path) -> None:
    cfg = _config_file(tmp_path, tiny_shards, "online", "train.max_steps=1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wbcfg"))
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(cfg), "log.wandb=online"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "wandb login" in lines[0] and "log.wandb=offline" in lines[0]


@pytest.mark.slow
def test_evaluate_with_a_garbage_model_or_config_is_one_line(tmp_path: Path, tiny_shards: Path) -> None:
    fit(tiny_shards, tmp_path, "ev", "train.max_steps=2")
    run = tmp_path / "ev"
    (run / "checkpoints" / "step-2" / "model.safetensors").write_bytes(b"\x00" * 10)
    proc = subprocess.run([sys.executable, "launch/evaluate.py", str(run), "--no-wandb"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "model.safetensors cannot be read" in proc.stderr and "Traceback" not in proc.stderr
    (run / "config.yaml").write_text("run: {name: [unclosed\n")
    proc = subprocess.run([sys.executable, "launch/evaluate.py", str(run), "--no-wandb"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_problems_found_late_are_found_before_step_one(tmp_path: Path, tiny_shards: Path) -> None:
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    with pytest.raises(UserError, match="eval.corruptions.big.*grid 5 must divide the image size 28x28"):
        fit(shards, tmp_path, "late", "eval.corruptions={big: [{jigsaw: {grid: 5}}]}")
    test_shard = next(shards.glob("test-*.tar"))
    data = bytearray(test_shard.read_bytes())
    data[-600] ^= 0xFF  # same size, other content: only the sha256 can tell
    test_shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shard {test_shard} is corrupt"):
        fit(shards, tmp_path, "late2")
    assert not (tmp_path / "late2" / "checkpoints").exists()  # refused before any training step


@pytest.mark.slow
def test_skipped_shards_and_a_one_sample_val_split_end_cleanly_on_two_ranks(tmp_path: Path, run_py) -> None:
    """data.on_error=skip with a corrupt train shard and a corrupt test shard, and a val split of one
    sample (rank 1 holds no val batch): two gloo ranks finish every epoch on the shorter stream."""
    from aedist.data import write_shards

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (417, 1, 28, 28), dtype=np.uint8), rng.integers(0, 4, 417)
    shards = tmp_path / "shards"  # blocks of 32, 4 per shard: train = 2 shards, test = 2 shards
    write_shards(shards, {"train": (x[:256], y[:256]), "val": (x[256:257], y[256:257]), "test": (x[257:], y[257:])},
                 ["a", "b", "c", "d"], samples_per_block=32, blocks_per_shard=4)
    for name in ("train-000001.tar", "test-000001.tar"):
        data = bytearray((shards / name).read_bytes())
        data[-600] ^= 0xFF
        (shards / name).write_bytes(bytes(data))
    cfg = _config_file(tmp_path, shards, "skip", "data.on_error=skip")
    accel = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    proc = run_py([*accel, "launch/train.py", "--config", str(cfg)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping shard" in proc.stderr and "train-000001.tar" in proc.stderr and "test-000001.tar" in proc.stderr
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["completed"] and summary["epoch"] == 2
    assert summary["step"] == 2 * (128 // 32)  # the 128 readable train samples, global batch 32
    assert np.isfinite(summary["val/loss"]) and np.isfinite(summary["test/loss"])


def test_messages_name_the_real_cause(tmp_path: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"data.batch_size=32 is larger than data.limit=8; lower the batch size"):
        fit(tiny_shards, tmp_path, "limit", "data.limit=8")
    import aedist.engine
    from aedist.engine import Diverged

    monkeypatch.setattr(aedist.engine, "INJECT_NAN", "0:1")  # the very first step diverges
    with pytest.raises(Diverged, match="no checkpoint was written yet"):
        fit(tiny_shards, tmp_path, "nan")


def test_figures_of_shards_that_name_no_classes(tmp_path: Path, tiny_shards: Path) -> None:
    """Per-sample shards from other tools carry labels but no class names: figures label by number."""
    import torch

    from aedist.evaluation import draw_figures, load_probe
    from aedist.models import build_model

    cfg = load_config(None, overrides(tiny_shards, tmp_path, "nonames", "model.latent_dim=2", "log.probe_size=16"))
    probe = load_probe(cfg, torch.device("cpu"))
    latents = ({"clean": np.zeros((len(probe[1]), 2), np.float32)}, probe[1].numpy())
    figs = draw_figures(build_model(cfg.model), cfg, probe, latents, [], full=True)
    assert figs and all(isinstance(v, np.ndarray) and v.ndim == 3 for v in figs.values())
