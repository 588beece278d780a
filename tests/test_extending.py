"""The README's "Layout and extending" example: one file, examples/aeparts.py, adds a model, a loss, a
metric, a corruption and a figure, and a short training run uses all five through the config alone.
The README shows that file's body; tests/test_imports.py runs it through the launch scripts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "aeparts.py"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout and extending"):text.index("## Configuration reference")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_shows_the_example_file() -> None:
    # The README block is the file from its first import on (the docstring and __future__ line are left out).
    source = EXAMPLE.read_text()
    assert readme_example() == source[source.index("from dataclasses import replace"):]


def test_example_extensions_train_end_to_end(tmp_path: Path, tiny_shards: Path) -> None:
    # A subprocess: the example registers globally, and the other tests assert the registries' contents.
    script = f"""
from aedist.engine import Trainer
from aedist.loading import load_config
cfg = load_config(None, ["data.shards={tiny_shards}", "run.dir={tmp_path}", "run.name=ext", "data.batch_size=32",
    "train.max_steps=2", "log.wandb=disabled", "train.compile=false", "model.name=tiny_mlp_ae", "model.params={{width: 32}}",
    "loss.name=huber", "corruption=[{{invert: {{p: 0.5}}}}]", "model.latent_dim=4", "eval.metrics=[mse, mae]"],
    imports=["examples/aeparts.py"])
assert Trainer(cfg).fit() == 0
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ext" / "summary.json").read_text())
    assert {"test/mae", "test/mse", "test/loss"} <= set(summary)
    assert (tmp_path / "ext" / "figures" / "first_recon_epoch000.png").exists()
    config = (tmp_path / "ext" / "config.yaml").read_text()
    assert "tiny_mlp_ae" in config and "width: 32" in config and "invert" in config
    assert str(EXAMPLE) in config  # recorded absolute: a resume from another folder finds it
