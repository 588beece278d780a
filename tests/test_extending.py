"""The README's "Layout and extending" examples, run as written: each adds one entry to a registry
in one place, and a short training run then uses all five through the config alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_examples() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout and extending"):text.index("## Configuration reference")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    return "\n".join(blocks)


def test_readme_extension_examples_train_end_to_end(tmp_path: Path, tiny_shards: Path) -> None:
    # A subprocess: the examples register globally, and the other tests assert the registries' contents.
    script = readme_examples() + f"""
from aedist.config import load_config
from aedist.engine import Trainer
cfg = load_config(None, ["data.shards={tiny_shards}", "run.dir={tmp_path}", "run.name=ext", "data.batch_size=32",
    "train.max_steps=2", "log.wandb=disabled", "train.compile=false", "model.name=tiny_mlp_ae", "model.params={{width: 32}}",
    "loss.name=huber", "corruption=[{{invert: {{p: 0.5}}}}]", "model.latent_dim=4", "eval.metrics=[mse, mae]"])
assert Trainer(cfg).fit() == 0
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ext" / "summary.json").read_text())
    assert {"test/mae", "test/mse", "test/loss"} <= set(summary)
    assert (tmp_path / "ext" / "figures" / "first_recon_epoch000.png").exists()
    config = (tmp_path / "ext" / "config.yaml").read_text()
    assert "tiny_mlp_ae" in config and "width: 32" in config and "invert" in config
