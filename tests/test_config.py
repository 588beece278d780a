"""Config schema: defaults, YAML + overrides, one-line errors with exit code 2, round trips."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from aedist.config import Config, config_from_dict, parse_override, reference_markdown, save_config
from aedist.errors import UserError
from aedist.loading import load_config  # the schema, then imports:, then the registered names (aedist.config: the schema alone)

ROOT = Path(__file__).resolve().parents[1]
RunFn = Callable[..., subprocess.CompletedProcess]  # the run_py / train fixtures

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
    cfg = load_config(ROOT / "configs/seeds/fashion_rotated.yaml", ["train.epochs=3", "optim.lr=3e-4", "log.tags=[a,b]",
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


def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(run_py: RunFn) -> None:
    proc = run_py(["launch/train.py", "--config", "configs/debug.yaml", "train.epoch=3"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: unknown config key 'train.epoch'") and "train.epochs" in lines[0]


def test_cli_missing_config_file_exits_2(run_py: RunFn) -> None:
    proc = run_py(["launch/train.py", "--config", "configs/nope.yaml"])
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_reference_lists_every_stable_key() -> None:
    ref = reference_markdown()
    for key in ["run.name", "run.dir", "data.shards", "data.batch_size", "train.epochs", "train.max_steps", "train.seed",
                "train.checkpoint_every", "train.resume", "model.name", "optim.lr", "log.wandb", "corruption"]:
        assert f"`{key}`" in ref
    assert isinstance(Config().run_dir, Path)


@pytest.mark.parametrize("path", sorted((ROOT / "configs/sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_trial_resolves_to_a_valid_config(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import itertools

    import yaml

    from aedist.sweeps import sweep_args

    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "launch/train.py" and "${args_no_hyphens}" in sweep["command"]
    grid = {k: v.get("values", [v.get("value")]) for k, v in sweep["parameters"].items()}
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    names = set()
    for i, combo in enumerate(itertools.product(*grid.values())):
        monkeypatch.setenv("WANDB_RUN_ID", f"trial{i}")
        args = [f"{k}={v}" for k, v in zip(grid, combo)]  # what ${args_no_hyphens} expands to
        config, overrides = sweep_args(None, args)
        cfg = load_config(config, overrides)
        assert cfg.run.name.endswith(f"-trial{i}")
        names.add(cfg.run.name)
    assert len(names) == len(list(itertools.product(*grid.values())))


def test_readme_reference_is_current() -> None:
    # The README's table is generated by `python -m aedist.config`; a changed field must update it.
    assert reference_markdown() in (ROOT / "README.md").read_text()
