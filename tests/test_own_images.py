"""Issue 27 items 0 and 4: a user's own image folder, packed, trained, evaluated and exported as the
README says, and the export formats round-tripping with identical outputs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_images
from PIL import Image
from safetensors.torch import load_file
from test_engine import RunFn, write_config

from aedist.config import config_from_dict, read_yaml
from aedist.data import write_shards
from aedist.evaluation.run import load_weights
from aedist.models import build_model

FAST = ["train.epochs=1", "data.batch_size=16", "log.wandb=disabled", "log.probe_size=8", "eval.knn_train=32"]


def photo_folder(root: Path, per_class: int = 20) -> None:
    """A flat class tree as a user has it: photos/CLASS/*.png, RGB 40x40 (resized to 32 by the packer)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = (rng.random((40, 40, 3)) * 60).astype(np.uint8)
            img[8 + 8 * c: 24 + 8 * c, 10:30, c] = 230  # a class-coloured bar: something to learn and to tell apart
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block under ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under {heading}"
    return [line for line in block.group(1).splitlines() if line.strip()]


def as_here(line: str) -> str:
    """A README line run from a scratch folder: this interpreter, the repository's scripts and configs."""
    line = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", line.split(" #")[0].rstrip())  # options appended below go before the comment
    line = re.sub(r"(?<![\w/])(launch|configs)/", lambda m: f"{ROOT}/{m.group(1)}/", line)
    if "launch/train.py" in line:
        line += " " + " ".join(FAST)
    return line


def bash(line: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and all(w in line for w in words), line


def test_readme_own_images_section_runs_as_written_and_exports_round_trip(tmp_path: Path) -> None:
    lines = readme_block("## Train on your own images")
    assert [ln.split()[1] for ln in lines] == ["launch/pack.py", "launch/train.py", "launch/evaluate.py", "launch/export.py"]
    photo_folder(tmp_path / "photos")

    pack = bash(as_here(lines[0]), tmp_path)
    assert pack.returncode == 0, pack.stderr[-2000:]
    manifest = json.loads((tmp_path / "shards/photos/manifest.json").read_text())
    counts = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    assert counts == {"train": 48, "val": 6, "test": 6}  # 60 images: 10 % each carved, the rest trains
    assert manifest["source"]["test_fraction"] == 0.1 and manifest["source"]["val_fraction"] == 0.1
    assert "test 6 (--test-fraction 0.1)" in pack.stdout and "train keeps 48" in pack.stdout, pack.stdout

    # The debug config as it is (1x28x28) names the two keys to set, with these shards' values.
    wrong = bash(as_here(lines[1]).replace("model.in_channels=3 model.image_size=32", ""), tmp_path)
    one_line_error(wrong, "set model.in_channels=3 model.image_size=32")

    for line in lines[1:]:
        proc = bash(as_here(line), tmp_path)
        assert proc.returncode == 0, (line, proc.stderr[-3000:])
    run, out = tmp_path / "runs/photos", tmp_path / "exported/photos"
    summary = json.loads((run / "summary.json").read_text())
    assert {"test/mse", "val/mse", "test/knn_acc"} <= set(summary)
    evaluated = json.loads((run / "eval.json").read_text())

    # safetensors round trip: the exported files alone rebuild the network with the checkpoint's outputs.
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "model.safetensors"]
    rebuilt = build_model(config_from_dict(read_yaml(out / "config.yaml", "config")).model)
    rebuilt.load_state_dict(load_file(out / "model.safetensors"))
    cfg = config_from_dict(read_yaml(run / "config.yaml", "config"))
    trained, _ = load_weights(cfg, run / "checkpoints/step-3", "auto", "cpu")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x).recon, trained(x).recon)
    card = (out / "README.md").read_text()
    assert "## Metrics (eval.json)" in card and f"| test/mse | {evaluated['test/mse']:.6g} |" in card
    command = (run / "command.txt").read_text().strip()
    assert "data.shards=shards/photos model.in_channels=3 model.image_size=32" in command and command in card

    # Without eval.json the card falls back to the training's last evaluation; --weights raw is the optimizer's.
    (run / "eval.json").unlink()
    raw = bash(as_here(lines[3]).replace("exported/photos", "exported/raw") + " --weights raw --checkpoint step-3", tmp_path)
    assert raw.returncode == 0, raw.stderr[-2000:]
    card = (tmp_path / "exported/raw/README.md").read_text()
    assert "## Metrics (summary.json)" in card and f"| val/mse | {summary['val/mse']:.6g} |" in card
    assert load_file(tmp_path / "exported/raw/model.safetensors").keys() == load_file(run / "checkpoints/step-3/model.safetensors").keys()

    # User mistakes: one line each, naming the fix.
    one_line_error(bash(as_here(lines[3]).replace("safetensors", "diffusers").replace("exported/photos", "exported/d"), tmp_path),
                   "--format diffusers needs a model.name=diffusers_kl run", "use --format safetensors")
    one_line_error(bash(as_here(lines[3]), tmp_path), "--out", "exists and is not an empty folder")
    one_line_error(bash(as_here(lines[0]).replace("shards/photos", "shards/x") + " --val-fraction 0.5 --test-fraction 0.5", tmp_path),
                   "--val-fraction 0.5 + --test-fraction 0.5 must be below 1")


@pytest.mark.parametrize("splits", [("train", "val"), ("train",)])
def test_training_evaluates_on_val_without_test_and_notes_when_there_is_neither(splits: tuple[str, ...], tmp_path: Path,
                                                                                 train: RunFn) -> None:
    data = {"train": make_images(64, seed=1), "val": make_images(32, seed=2)}
    write_shards(tmp_path / "shards", {k: data[k] for k in splits}, ["a", "b", "c", "d"], samples_per_block=32, blocks_per_shard=2)
    cfg = write_config(tmp_path, tmp_path / "shards", "r", data={"batch_size": 32, "eval_batch_size": 32}, train={"epochs": 1})
    proc = train(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/r/summary.json").read_text())
    assert not [k for k in summary if k.startswith("test")]
    figures = list((tmp_path / "runs/r/figures").glob("*.png")) if (tmp_path / "runs/r/figures").is_dir() else []
    if "val" in splits:  # val stands in for test: its metrics, kNN on its latents, figures of its images
        assert {"val/mse", "val/knn_acc"} <= set(summary) and figures
        assert "nothing is evaluated" not in proc.stdout + proc.stderr
    else:
        assert not [k for k in summary if "/" in k and k.split("/")[0] in ("val", "test")] and not figures
        assert "has no val or test split, so nothing is evaluated" in proc.stdout + proc.stderr
