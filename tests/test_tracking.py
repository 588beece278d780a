"""W&B offline run read back from its own folder, local mirrors, evaluate.py and report.py."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import write_config
from wandb.proto import wandb_internal_pb2

RunFn = Callable[..., subprocess.CompletedProcess]  # the run_py / train fixtures

pytestmark = pytest.mark.slow
BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of framed records


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a .wandb file (header ':W&B', magic 0xBEE1, version; then crc, length, type frames)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block tail too short for a frame header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            pos += (BLOCK - pos % BLOCK) % BLOCK
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # FULL or LAST: a whole record is assembled
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(records: list[wandb_internal_pb2.Record]) -> list[dict[str, object]]:
    """History rows as dicts; an image entry arrives as nested keys (name, field) -> {field: value}."""
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict[str, object] = {}
        for item in rec.history.item:
            value = json.loads(item.value_json)
            if item.key or len(item.nested_key) == 1:
                row[item.key or item.nested_key[0]] = value
            else:
                row.setdefault(item.nested_key[0], {})[item.nested_key[1]] = value  # type: ignore[index]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path, run_py: RunFn) -> Path:
    tmp = tmp_path_factory.mktemp("wandb")
    cfg = write_config(tmp, tiny_shards, "tracked", corruption=[{"rotate": {"max_degrees": 90}}],
                       eval={"knn_train": 64, "corruptions": {"rotated": [{"rotate": {"max_degrees": 180}}]}},
                       log={"wandb": "offline", "every": 2, "probe_size": 16, "tags": ["test"]})
    proc = run_py(["launch/train.py", "--config", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs/tracked"


def knn_reference(run: Path, val: int, train: int) -> dict[str, float]:
    """kNN accuracy and class-region spread of the run's newest checkpoint on its first ``val`` val images,
    fitted on its first ``train`` train images: computed here from the loader and the weights, apart from
    launch/evaluate.py (the spread moves with every train latent, so a smaller fit cannot match it by chance)."""
    from aedist.batch import prepare_batch
    from aedist.data import load_batches
    from aedist.evaluation.run import load_weights
    from aedist.loading import load_run_config
    from aedist.metrics import class_regions, knn_accuracy

    cfg = load_run_config(run, ())
    newest = max((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    model, _ = load_weights(cfg, newest, "auto", "cpu")

    def encode(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*load_batches(cfg.data.shards, split, n, shuffle=False, drop_last=False, limit=n))
        with torch.no_grad():
            z = model.encode(prepare_batch(torch.cat(xs), [], None, normalize=cfg.data.normalize).inputs)
        return z.float().numpy(), torch.cat(ys).numpy()

    fit, scored = encode("train", train), encode("val", val)
    assert len(fit[1]) == train and len(scored[1]) == val
    return {"knn_acc": knn_accuracy(*fit, *scored, k=cfg.eval.knn_k), "spread": class_regions(*fit, *scored)["spread"]}


def test_offline_run_records_scalars_and_images(offline_run: Path) -> None:
    (folder,) = list((offline_run / "wandb").glob("offline-run-*"))
    run_id = json.loads((offline_run / "summary.json").read_text())["wandb_run_id"]
    assert folder.name.endswith(run_id)
    rows = history(read_records(folder / f"run-{run_id}.wandb"))
    keys = set().union(*rows)
    for key in ["train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "train/data_wait_s", "val/loss",
                "test/mse", "test/psnr_db", "test/snr_db", "test_rotated/mse", "test/knn_acc"]:
        assert key in keys, key
    image_rows = [r for r in rows if "figures/recon" in r]
    assert len(image_rows) == 2  # epoch 1 and the last epoch (2)
    image_keys = {k for k in keys if k.startswith("figures/")}
    assert {"figures/recon", "figures/recon_rotated", "figures/latent_pca", "figures/interpolation",
            "figures/rotation_panel"} <= image_keys
    steps = [r["_step"] for r in rows if "train/loss" in r]
    assert steps == sorted(steps) and steps[0] == 2
    # Each image entry points at a media file that is a valid PNG of the size the entry records,
    # and the same size as the local mirror under figures/.
    local = {p.stem.rsplit("_epoch", 1)[0]: p for p in (offline_run / "figures").glob("*.png")}
    for row in image_rows:
        for key in image_keys & set(row):
            entry = row[key]
            assert entry["_type"] == "images/separated" and entry["count"] == 1
            (name,) = entry["filenames"]
            with Image.open(folder / "files" / name) as im:
                im.verify()
            with Image.open(folder / "files" / name) as im, Image.open(local[key.removeprefix("figures/")]) as mirror:
                assert im.size == (entry["width"], entry["height"]) == mirror.size
                assert min(im.size) >= 32


def test_local_mirrors_match_what_was_logged(offline_run: Path) -> None:
    lines = [json.loads(line) for line in (offline_run / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "epoch"} <= set(line) for line in lines)
    assert any("train/loss" in line for line in lines) and any("test/psnr_db" in line for line in lines)
    figures = {p.name for p in (offline_run / "figures").glob("*.png")}
    assert {"recon_epoch001.png", "recon_epoch002.png", "rotation_panel_epoch002.png"} <= figures


def test_evaluate_writes_finite_metrics_and_report_tables_them(offline_run: Path, tmp_path: Path, run_py: RunFn) -> None:
    proc = run_py(["launch/evaluate.py", str(offline_run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = json.loads((offline_run / "eval.json").read_text())
    for key in ["test/mse", "test/psnr_db", "test/snr_db", "test_rotated/mse", "test_rotated/input_mse",
                "test/knn_acc", "test_rotated/decoded_class_acc", "test/latent_kl"]:
        assert math.isfinite(values[key]), key
    # Same final weights, same test split, deterministic pass: evaluate.py must reproduce the
    # end-of-training number the engine measured.
    summary = json.loads((offline_run / "summary.json").read_text())
    assert values["test/mse"] == pytest.approx(summary["test/mse"], rel=1e-4)
    # the speed figures name the machine they were measured on: this CPU's model line, as the kernel reports it
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    assert summary["device"].startswith(f"{cpu}, {len(os.sched_getaffinity(0))} cores, ")
    # The evaluation went to the training run's W&B id (offline: a second folder with the same id).
    run_id = json.loads((offline_run / "summary.json").read_text())["wandb_run_id"]
    folders = sorted((offline_run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2
    rows = history(read_records(folders[-1] / f"run-{run_id}.wandb"))
    assert any(row.get("eval/test/mse") == pytest.approx(values["test/mse"]) for row in rows)
    assert any("eval/recon" in row for row in rows)
    # the data itself, drawn only by the full evaluations: the last epoch's and evaluate.py's
    figures = offline_run / "figures"
    assert (figures / "eval_samples_epoch002.png").exists() and (figures / "samples_epoch002.png").exists()
    assert not (figures / "samples_epoch001.png").exists() and (figures / "recon_epoch001.png").exists()
    report = tmp_path / "RESULTS.md"
    proc = run_py(["launch/report.py", str(offline_run), "--out", str(report)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    assert "| tracked | tiny | 2 |" in text and f"{values['test/mse']:.4f}" in text
    assert "launch/train.py" in text and (tmp_path / "figures/tracked_recon.png").exists()
    # the train split in eval mode goes to its own file and keys; eval.json (test) stays as it was
    proc = run_py(["launch/evaluate.py", str(offline_run), "--split", "train", "--no-wandb"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((offline_run / "eval_train.json").read_text())
    assert math.isfinite(train["train_eval/mse"]) and not any(k.startswith("test") for k in train)
    assert json.loads((offline_run / "eval.json").read_text()) == values
    from aedist.runs import load_run
    assert load_run(offline_run).value("train_eval/mse") == train["train_eval/mse"]
    # --limit: the split's first N images, recorded; another sample gives another number
    proc = run_py(["launch/evaluate.py", str(offline_run), "--split", "train", "--no-wandb", "--limit", "16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sample = json.loads((offline_run / "eval_train.json").read_text())
    assert sample["limit"] == 16 and "limit" not in train and sample["train_eval/mse"] != train["train_eval/mse"]
    # --limit cuts the scored split only: the kNN is still fitted on all eval.knn_train (64) train images
    proc = run_py(["launch/evaluate.py", str(offline_run), "--split", "val", "--no-wandb", "--no-figures", "--limit", "32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored, reference = json.loads((offline_run / "eval_val.json").read_text()), knn_reference(offline_run, val=32, train=64)
    assert scored["val/knn_acc"] == reference["knn_acc"] and scored["val/latent_spread"] == pytest.approx(reference["spread"], rel=1e-4)
    # --metrics scores the run with more than it logged; the run's own numbers do not move
    figures = {p: p.stat().st_mtime_ns for p in (offline_run / "figures").iterdir()}
    proc = run_py(["launch/evaluate.py", str(offline_run), "--split", "val", "--no-wandb", "--metrics", "variety", "--no-figures"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (offline_run / "figures").iterdir()} == figures  # --no-figures: none drawn or touched
    val = json.loads((offline_run / "eval_val.json").read_text())
    assert 0 <= val["val/variety"] < 5 and val["val_rotated/variety"] >= 0 and math.isfinite(val["val/mse"])
    proc = run_py(["launch/evaluate.py", str(offline_run), "--no-wandb", "--metrics", "varietee"])
    assert proc.returncode == 2 and "--metrics" in proc.stderr and "variety" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_on_a_folder_that_is_no_run_is_a_one_line_error(tmp_path: Path, run_py: RunFn) -> None:
    proc = run_py(["launch/evaluate.py", str(tmp_path)])
    assert proc.returncode == 2 and "not a run folder" in proc.stderr and "Traceback" not in proc.stderr


# What SLURM does on a requeue: SIGTERM to every process of the step, W&B's service among them, while
# the trainer runs on to the step where every rank saves. Logging in between must not kill the rank.
LOST_SERVICE = """
import signal, sys
import numpy as np, psutil
from accelerate import Accelerator
from aedist.config import load_config
from aedist.tracking import Tracker, trackers_for
cfg = load_config(sys.argv[1], [f"run.dir={sys.argv[2]}", "run.name=lost", "log.wandb=offline"])
tracker = Tracker(Accelerator(cpu=True, log_with=trackers_for(cfg)), cfg, "lost0001")
tracker.log({"train/loss": 1.0}, step=1, epoch=0)
service = [p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline())]
assert service, "no W&B service process found"
for p in service:
    p.send_signal(signal.SIGTERM)
psutil.wait_procs(service, timeout=30)
for step in (2, 3):
    tracker.log({"train/loss": 1.0 / step}, step=step, epoch=0)
tracker.log_images({"figures/recon": np.zeros((8, 8, 3), np.uint8)}, step=3, epoch=1)
tracker.close()
print("finished", flush=True)
"""


def test_a_killed_wandb_service_leaves_the_rank_running_and_logging_locally(tmp_path: Path, tiny_shards: Path, run_py: RunFn) -> None:
    cfg = write_config(tmp_path, tiny_shards, "lost")
    script = tmp_path / "lost_service.py"
    script.write_text(LOST_SERVICE)
    proc = run_py([str(script), str(cfg), str(tmp_path / "runs")], env={"WANDB_SILENT": "false"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "finished" in proc.stdout, out[-3000:]
    assert out.count("warning: the trackers failed") == 1 and "Traceback" not in out, out[-3000:]
    run = tmp_path / "runs/lost"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert (run / "figures/recon_epoch001.png").exists()
    assert list((run / "wandb").glob("offline-run-*-lost0001"))  # W&B had started for real (what it had not
    # written yet when its service died is lost with it: the next attempt continues the same W&B run)
