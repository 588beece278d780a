"""Config schema: defaults, YAML + overrides, one-line errors with exit code 2, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from aedist.config import Config, config_from_dict, load_config, parse_override, reference_markdown, save_config
from aedist.errors import UserError
from conftest import ROOT, run_py

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_seed_000_model() -> None:
    cfg = load_config()
    assert (cfg.model.name, cfg.model.channels, cfg.model.latent_dim) == ("conv_ae", [32, 64, 128], 2)
    assert cfg.run.dir == "runs" and cfg.train.resume == "auto" and cfg.corruption == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert cfg.run.name == path.stem
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed_and_win_over_yaml() -> None:
    cfg = load_config(ROOT / "configs/fashion_rotated.yaml", ["train.epochs=3", "optim.lr=3e-4", "log.tags=[a,b]",
                                                               "corruption=[{rot90: {}}]", "run.name=123"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == pytest.approx(3e-4) and cfg.log.tags == ["a", "b"]
    assert cfg.corruption == [{"rot90": {}}] and cfg.run.name == "123"
    assert cfg.data.batch_size == 64  # untouched YAML value survives
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("override, words", [
    ("train.epoch=3", ["unknown config key 'train.epoch'", "did you mean 'train.epochs'"]),
    ("trian.epochs=3", ["unknown config key 'trian'", "did you mean 'train'"]),
    ("train.epochs=three", ["'train.epochs'", "'three'", "integer"]),
    ("train.epochs=0", ["'train.epochs'", "0", ">= 1"]),
    ("optim.scheduler=cosin", ["'optim.scheduler'", "none, plateau, cosine", "did you mean 'cosine'"]),
    ("train.channels_last=maybe", ["'train.channels_last'", "true or false"]),
    ("model.dropout=1.5", ["'model.dropout'", "<= 0.95"]),
    ("corruption=[{rotat: {max_degrees: 9}}]", ["corruption", "rotat", "rotate"]),
    ("train.epochs", ["key=value"]),
])
def test_bad_values_name_key_value_and_allowed(override: str, words: list[str]) -> None:
    with pytest.raises(UserError) as err:
        load_config(ROOT / "configs/debug.yaml", [override])
    for word in words:
        assert word in str(err.value)


def test_cli_bad_config_exits_2_with_one_line_and_no_traceback() -> None:
    proc = run_py(["launch/train.py", "--config", "configs/debug.yaml", "train.epoch=3"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: unknown config key 'train.epoch'") and "train.epochs" in lines[0]


def test_cli_missing_config_file_exits_2() -> None:
    proc = run_py(["launch/train.py", "--config", "configs/nope.yaml"])
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_reference_lists_every_stable_key() -> None:
    ref = reference_markdown()
    for key in ["run.name", "run.dir", "data.shards", "data.batch_size", "train.epochs", "train.max_steps", "train.seed",
                "train.checkpoint_every", "train.resume", "model.name", "optim.lr", "log.wandb", "corruption"]:
        assert f"`{key}`" in ref
    assert isinstance(Config().run_dir, Path)
