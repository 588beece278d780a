"""Issue 27 items 2 and 3: TensorBoard with everything W&B gets, read back with TensorBoard's own reader,
and checkpoints as W&B model artifacts, read back from the offline run's transaction log."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from test_engine import write_config
from test_tracking import read_records

RunFn = Callable[..., subprocess.CompletedProcess]  # the run_py fixture

pytestmark = pytest.mark.slow


def test_tensorboard_gets_scalars_figures_and_the_config(tmp_path: Path, tiny_shards: Path, run_py: RunFn) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = write_config(tmp_path, tiny_shards, "tb", log={"wandb": "disabled", "tensorboard": True, "every": 2, "probe_size": 16})
    proc = run_py(["launch/train.py", "--config", str(cfg)], env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs/tb"
    (logdir,) = {p.parent for p in (run / "aedist").glob("events.out.tfevents.*")}  # Accelerate: project_dir/PROJECT
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    # Scalars: the same steps and values as the local record.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("train/loss")] == expected
    for key in ["train/lr", "val/loss", "test/mse", "test/psnr_db"]:
        assert key in tags["scalars"], key
    # Figures: each one at epoch 1 and the last epoch, a PNG of the local mirror's size.
    assert {"figures/recon", "figures/latent_pca", "figures/interpolation"} <= set(tags["images"])
    recon = acc.Images("figures/recon")
    assert len(recon) == 2
    with Image.open(io.BytesIO(recon[-1].encoded_image_string)) as im, Image.open(run / "figures/recon_epoch002.png") as mirror:
        assert im.size == mirror.size == (recon[-1].width, recon[-1].height)
        assert im.tobytes() == mirror.convert(im.mode).tobytes()
    # The resolved config as text: config.yaml as the trainer wrote it.
    (config_tag,) = [t for t in tags["tensors"] if t.startswith("config")]
    text = acc.Tensors(config_tag)[0].tensor_proto.string_val[0].decode()
    config = (run / "config.yaml").read_text()
    assert "name: tb" in config and "tensorboard: true" in config
    assert [line.removeprefix("    ") for line in text.splitlines()] == config.splitlines()


def test_tensorboard_missing_is_one_line_before_step_one(tmp_path: Path, tiny_shards: Path, run_py: RunFn) -> None:
    # An environment without the package: a tensorboard that cannot be imported shadows the installed one.
    hidden = tmp_path / "no_tensorboard/tensorboard"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'tensorboard'\", name='tensorboard')\n")
    cfg = write_config(tmp_path, tiny_shards, "notb", log={"tensorboard": True})
    proc = run_py(["launch/train.py", "--config", str(cfg)], env={"PYTHONPATH": str(hidden.parent)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "pip install tensorboard, or set log.tensorboard=false" in lines[0], proc.stderr
    assert not (tmp_path / "runs/notb/metrics.jsonl").exists()  # not one step was taken


def artifacts(folder: Path) -> list:
    (log,) = folder.glob("run-*.wandb")
    return [r.artifact for r in read_records(log) if r.WhichOneof("record_type") == "artifact"]


def md5_b64(path: Path) -> str:
    """W&B's manifest digest of a file: base64 of its MD5."""
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_wandb_artifacts_hold_best_and_last_checkpoints_once(tmp_path: Path, tiny_shards: Path, run_py: RunFn) -> None:
    cfg = write_config(tmp_path, tiny_shards, "arts", log={"wandb": "offline", "wandb_artifacts": "both", "probe_size": 16})
    env = {"WANDB_DATA_DIR": str(tmp_path / "wandb_data")}  # W&B's staging copies of the files, kept out of $HOME
    proc = run_py(["launch/train.py", "--config", str(cfg)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs/arts"
    summary = json.loads((run / "summary.json").read_text())
    (folder,) = (run / "wandb").glob("offline-run-*")
    (run_record,) = [r.run for r in read_records(next(folder.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run"]
    assert run_record.run_group == "arts" and run_record.job_type == "train"  # grouped by experiment (no log.group)

    logged = artifacts(folder)
    assert logged and all(a.type == "model" and a.name == "arts-model" for a in logged)
    best = [a for a in logged if "best" in a.aliases]
    (last,) = [a for a in logged if "best" not in a.aliases]
    best_step = json.loads((run / "checkpoints/best/state.json").read_text())["step"]
    record = json.loads((run / "artifacts.json").read_text())
    assert record == {"best": [json.loads(a.metadata)["step"] for a in best], "last": [summary["step"]]}
    assert record["best"][-1] == best_step
    # The last version: the final step checkpoint's weights, the config and the summary; alias latest.
    files = {c.path: c for c in last.manifest.contents}
    assert set(files) == {"model.safetensors", "config.yaml", "summary.json"}
    assert {"latest", f"step-{summary['step']}"} <= set(last.aliases)
    final = run / f"checkpoints/step-{summary['step']}"
    assert files["model.safetensors"].digest == md5_b64(final / "model.safetensors")
    assert files["config.yaml"].digest == md5_b64(run / "config.yaml")
    # The staged copy W&B will upload is those bytes (the checkpoint folder may be rotated away before).
    assert Path(files["model.safetensors"].local_path).read_bytes() == (final / "model.safetensors").read_bytes()
    # The newest best version: the weights now in checkpoints/best.
    best_files = {c.path: c for c in best[-1].manifest.contents}
    assert best_files["model.safetensors"].digest == md5_b64(run / "checkpoints/best/model.safetensors")

    # Started again (as a requeue would): the same checkpoints are saved again, and not logged twice.
    proc = run_py(["launch/train.py", "--config", str(cfg)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and (run / f"checkpoints/step-{summary['step']}").is_dir()
    assert artifacts(folders[-1]) == []
    assert json.loads((run / "artifacts.json").read_text()) == record
