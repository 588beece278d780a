"""Training engine: DDP exactness through `accelerate launch` (2 gloo processes), kill-and-resume
exactness, preemption signals, NaN agreement across ranks, atomic checkpoints, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RunFn = Callable[..., subprocess.CompletedProcess]  # the run_py / train fixtures

pytestmark = pytest.mark.slow


def write_config(tmp: Path, shards: Path, name: str, **sections: dict) -> Path:
    base = {
        "run": {"name": name, "dir": str(tmp / "runs")},
        "data": {"shards": str(shards), "batch_size": 64, "eval_batch_size": 64},
        "model": {"channels": [8, 16, 32], "latent_dim": 4},
        "train": {"epochs": 2, "seed": 3},
        "log": {"wandb": "disabled", "every": 1, "probe_size": 16},
        "eval": {"knn_train": 64},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def weights(run: Path, ckpt: str | None = None) -> dict[str, torch.Tensor]:
    root = run / "checkpoints"
    folder = root / ckpt if ckpt else max((p for p in root.glob("step-*")), key=lambda p: int(p.name[5:]))
    return load_file(folder / "model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("precision, accums, tol", [("no", (1, 2), 1e-6), ("bf16", (1,), 2e-2)],
                         ids=["fp32-accum1+2", "bf16"])
def test_ddp_sgd_step_matches_single_process(tmp_path: Path, tiny_shards: Path, precision: str, accums: tuple[int, ...],
                                             tol: float, train: RunFn) -> None:
    # The global batch is the whole train split (256), so 1 and 2 ranks see the same samples. One 2-rank step
    # is the reference for every single-process accumulation (each a process start: CI time is counted).
    common = {"data": {"batch_size": 256}, "optim": {"name": "sgd", "lr": 0.5},
              "train": {"max_steps": 1, "epochs": 1, "mixed_precision": precision}}
    p2 = train(write_config(tmp_path, tiny_shards, "two", **common), procs=2)
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert json.loads((tmp_path / "runs/two/summary.json").read_text())["world_size"] == 2
    init = write_config(tmp_path, tiny_shards, "init", **{**common, "optim": {"name": "sgd", "lr": 0.0}})
    assert train(init).returncode == 0
    w2, w0 = weights(tmp_path / "runs/two"), weights(tmp_path / "runs/init")
    assert max_diff(w2, w0) > 1e-4  # the step really moved the weights
    for accum in accums:
        p1 = train(write_config(tmp_path, tiny_shards, f"one-{accum}", **common), f"train.grad_accum={accum}")
        assert p1.returncode == 0, p1.stderr[-2000:]
        assert max_diff(weights(tmp_path / f"runs/one-{accum}"), w2) <= tol, f"grad_accum={accum}"


def test_two_process_run_reaches_single_process_val_loss(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    common = {"train": {"epochs": 6}, "log": {"wandb": "disabled", "every": 4}}
    p1 = train(write_config(tmp_path, tiny_shards, "one", **common))
    p2 = train(write_config(tmp_path, tiny_shards, "two", **common), procs=2)
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-2000:]
    v1 = json.loads((tmp_path / "runs/one/summary.json").read_text())["val/loss"]
    v2 = json.loads((tmp_path / "runs/two/summary.json").read_text())["val/loss"]
    assert abs(v2 - v1) / v1 <= 0.05, (v1, v2)


def _slow_resumable(tmp: Path, shards: Path, name: str) -> Path:
    # 96 small steps, checkpoints every 20; no per-epoch evaluation so the run is only steps.
    return write_config(tmp, shards, name, data={"batch_size": 32}, model={"channels": [16, 32, 64], "latent_dim": 4},
                        corruption=[{"rotate": {"max_degrees": 45}}],
                        train={"epochs": 12, "checkpoint_every": 20, "eval_every": 1000, "keep_last": 3},
                        log={"wandb": "disabled", "every": 10, "figures_every": 1000, "probe_size": 16})


def _start(cfg: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, "launch/train.py", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"trainer exited early: {proc.stderr.read()[-2000:]}"
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.01)


def kill_and_resume(train: RunFn, cfg: Path, run: Path, step: int) -> None:
    """Start ``launch/train.py`` on ``cfg``, SIGKILL it once checkpoint ``step-N`` of ``run`` is complete,
    then run the same command again to the end (it must resume and finish)."""
    proc = _start(cfg)
    _wait_for(run / f"checkpoints/step-{step}/COMPLETE", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    resumed = train(cfg)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    ref = _slow_resumable(tmp_path, tiny_shards, "ref")
    assert train(ref).returncode == 0
    cfg = _slow_resumable(tmp_path, tiny_shards, "killed")
    run = tmp_path / "runs/killed"
    kill_and_resume(train, cfg, run, 40)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] and summary["resumed_from"][0] >= 40
    ref_summary = json.loads((tmp_path / "runs/ref/summary.json").read_text())
    assert summary["step"] == ref_summary["step"] == 96
    assert max_diff(weights(run), weights(tmp_path / "runs/ref")) <= 1e-6


def test_a_finished_run_resumed_for_more_epochs_is_unfinished_until_it_finishes_again(tmp_path: Path, tiny_shards: Path,
                                                                                       train: RunFn) -> None:
    cfg = write_config(tmp_path, tiny_shards, "longer", train={"epochs": 1})
    assert train(cfg).returncode == 0
    run = tmp_path / "runs/longer"
    first = json.loads((run / "summary.json").read_text())
    assert first["completed"] and first["epoch"] == 1
    # the second leg dies at its first step: the old summary must not call the run finished
    proc = train(cfg, "train.epochs=2", env={"AEDIST_INJECT_NAN": f"0:{first['step'] + 1}"})
    assert proc.returncode != 0 and not (run / "summary.json").exists()
    assert train(cfg, "train.epochs=2").returncode == 0
    assert json.loads((run / "summary.json").read_text())["epoch"] == 2


def test_sigusr1_saves_exits_75_and_resumes(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    cfg = _slow_resumable(tmp_path, tiny_shards, "preempted")
    run = tmp_path / "runs/preempted"
    proc = _start(cfg)
    _wait_for(run / "checkpoints/step-20/COMPLETE", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert saved[-1] > 20 and not (run / "summary.json").exists()
    again = train(cfg)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == [saved[-1]] and summary["step"] == 96


def test_nan_on_one_rank_stops_both_without_hanging(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    cfg = write_config(tmp_path, tiny_shards, "nan", train={"epochs": 3, "checkpoint_every": 2})
    t0 = time.time()
    proc = train(cfg, procs=2, env={"AEDIST_INJECT_NAN": "1:5"})
    assert time.time() - t0 < 240
    assert proc.returncode != 0
    assert "loss is not finite at step 5" in proc.stderr
    run = tmp_path / "runs/nan"
    kept = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    assert kept[-1] == 4 and not (run / "summary.json").exists()


def test_skipping_bad_steps_is_allowed_when_asked(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    cfg = write_config(tmp_path, tiny_shards, "skip", train={"epochs": 2, "max_bad_steps": 1})
    proc = train(cfg, env={"AEDIST_INJECT_NAN": "0:3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "non-finite loss at step 3" in proc.stdout + proc.stderr


def test_half_written_checkpoints_are_ignored_on_resume(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    cfg = write_config(tmp_path, tiny_shards, "atomic", train={"epochs": 2})
    assert train(cfg).returncode == 0
    ckpts = tmp_path / "runs/atomic/checkpoints"
    newest = max(int(p.name[5:]) for p in ckpts.glob("step-*"))
    (ckpts / f"step-{newest + 5}").mkdir()  # a crash after the folder appeared but before its marker
    (ckpts / f"step-{newest + 5}" / "model.safetensors").write_bytes(b"garbage")
    (ckpts / f".tmp-step-{newest + 9}").mkdir()
    again = train(cfg, "train.epochs=3")
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((tmp_path / "runs/atomic/summary.json").read_text())
    assert summary["resumed_from"] == [newest] and summary["epoch"] == 3


def test_checkpoint_from_another_model_is_a_one_line_error(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    cfg = write_config(tmp_path, tiny_shards, "shape", train={"epochs": 1})
    assert train(cfg).returncode == 0
    proc = train(cfg, "model.latent_dim=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "different model" in line and "train.resume=never" in line


@pytest.mark.parametrize("overrides, words", [
    (["data.shards=/nonexistent/shards"], ["/nonexistent/shards", "launch/pack.py"]),
    (["data.batch_size=63", "train.grad_accum=2"], ["data.batch_size=63", "multiple of 2"]),
    (["model.image_size=32"], ["(1, 28, 28)", "model.image_size"]),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, tiny_shards: Path, overrides: list[str], words: list[str], train: RunFn) -> None:
    cfg = write_config(tmp_path, tiny_shards, "bad")
    proc = train(cfg, *overrides)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in proc.stderr


def test_expanded_dataset_trains_on_every_copy_and_evaluates_class_regions(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    """data.repeat 3 + repeat_clean 1 (seed 000's form: originals + rotated versions in one shuffled
    epoch): 3x the steps, every copy of every image once per epoch (the loader's id dump), and the
    per-class and class-region metrics in the summary."""
    cfg = write_config(tmp_path, tiny_shards, "rep", data={"repeat": 3, "repeat_clean": 1}, corruption=[{"rotate": {"max_degrees": 180}}],
                       eval={"knn_train": 64, "corruptions": {"rotated": [{"rotate": {"max_degrees": 180}}]}}, log={"wandb": "disabled", "every": 4})
    dump = tmp_path / "ids"
    dump.mkdir()
    proc = train(cfg, env={"AEDIST_DUMP_IDS": str(dump)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "rep" / "summary.json").read_text())
    assert summary["step"] == 2 * 3 * 256 // 64
    for epoch in (0, 1):
        (f,) = dump.glob(f"train-epoch{epoch}-*.i64")
        ids = np.fromfile(f, dtype=np.int64)
        assert sorted(ids.tolist()) == list(range(3 * 256))  # each of the 3 copies of the 256 images exactly once
    for key in ("test_rotated/latent_in_class", "test/latent_in_class", "test/latent_spread", "test_rotated/decoded_class_acc/a"):
        assert 0 <= summary[key] <= (1 if "in_class" in key or "acc" in key else 100), key


def test_repeat_clean_without_a_corruption_or_enough_copies_is_one_line(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    from conftest import one_line_error

    cfg = write_config(tmp_path, tiny_shards, "rc")
    one_line_error(train(cfg, "data.repeat=6", "data.repeat_clean=1"), "data.repeat_clean=1", "needs a corruption")
    one_line_error(train(cfg, "data.repeat_clean=1", "corruption=[{rotate: {}}]"), "fewer clean copies than data.repeat=1")
    one_line_error(train(cfg, "data.repeat=2", "data.repeat_clean=1", "corruption=[{copies: {n: 1}}]"), "does not combine", "in-batch `copies`")


def test_a_run_stuck_at_one_output_is_warned_about_in_its_log(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    """SGD with lr x weight_decay = 1 replaces every weight by -lr x its gradient at each step: the
    weights stay near 0, so the model gives about one image for every input (variety ~ 0)."""
    cfg = write_config(tmp_path, tiny_shards, "dead", optim={"name": "sgd", "lr": 1e-3, "weight_decay": 1e3})
    proc = train(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs/dead/metrics.jsonl").read_text().splitlines()]
    varieties = [r["val/variety"] for r in rows if "val/variety" in r]
    assert len(varieties) == 2 and max(varieties) < 0.05, varieties
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: val/variety")]
    assert len(warnings) == 1 and "at epoch 1" in warnings[0] and "collapsed" in warnings[0], proc.stdout[-2000:]  # once, not per epoch


def test_collapse_watch_warns_on_entry_and_notes_recovery_once_each() -> None:
    from types import SimpleNamespace

    from aedist.engine import Trainer

    said: list[str] = []
    trainer = SimpleNamespace(collapsed=False, state=SimpleNamespace(epoch=0), accelerator=SimpleNamespace(print=said.append))
    for epoch, values in enumerate([{"val/variety": 0.8}, {"val/variety": 0.01}, {"val/variety": 0.02}, {"val/mse": 0.1},
                                    {"val/variety": 0.9, "test/variety": 0.0}, {"test/variety": float("nan")}], start=1):
        trainer.state.epoch = epoch
        Trainer._watch_collapse(trainer, values)  # type: ignore[arg-type]
    assert said == ["warning: val/variety 0.010 at epoch 2: the outputs barely vary between images, the model gives about "
                    "one image for every input (collapsed; README: Collapsed runs)",
                    "note: val/variety back to 0.900 at epoch 5: the outputs vary between images again"]


def test_test_and_figure_cadence_leave_the_trained_weights_unchanged(tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    # reproduce.sh runs the test pass and figures after the last epoch only; that is a speed choice only if
    # evaluation draws nothing from the training RNG (a VAE samples its latent and dropout masks with it).
    runs = {}
    for name, every in (("each", 1), ("last", 3)):
        cfg = write_config(tmp_path, tiny_shards, name, model={"name": "conv_vae", "dropout": 0.2},
                           corruption=[{"gaussian_noise": {"sigma": 0.2}}], eval={"knn_train": 64, "corruptions": {"noisy": [{"gaussian_noise": {"sigma": 0.2}}]}},
                           train={"epochs": 3, "test_every": every}, log={"figures_every": every})
        assert train(cfg).returncode == 0
        runs[name] = tmp_path / "runs" / name
    tested = lambda run: [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "test/mse" in r]  # noqa: E731
    assert tested(runs["each"]) == [1, 2, 3] and tested(runs["last"]) == [3]
    assert max_diff(weights(runs["each"]), weights(runs["last"])) == 0.0


def test_a_run_without_val_split_that_skips_test_passes_draws_its_epoch_1_figures_without_latents(tmp_path: Path, train: RunFn) -> None:
    # seed 000's repeats: no val split and train.test_every=51, so epoch 1 (whose figures are always drawn)
    # has no latents at all; the latent plot is left out instead of the run crashing
    from conftest import make_images

    from aedist.data import write_shards

    shards = tmp_path / "noval"
    write_shards(shards, {"train": make_images(128, seed=1), "test": make_images(32, seed=3)}, class_names=["a", "b", "c", "d"],
                 samples_per_block=32, blocks_per_shard=4, seed=0)
    cfg = write_config(tmp_path, shards, "noval", train={"epochs": 2, "test_every": 2}, log={"figures_every": 2})
    proc = train(cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = {p.name for p in (tmp_path / "runs/noval/figures").iterdir()}
    assert "recon_epoch001.png" in figures and "latent_pca_epoch001.png" not in figures and "latent_pca_epoch002.png" in figures
