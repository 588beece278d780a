"""Extensions by import (issue 27, item 1): ``imports:`` in a config and ``--import`` on the launch scripts.

A two-process ``accelerate launch`` trains with examples/aeparts.py (its model, loss, metric, corruption
and figure); the run's config.yaml records the file and evaluate.py, a resume from another folder and
report.py import it again from there. Every way an import can fail is one line and exit 2. The one-node
SLURM job with the example is in tests/test_slurm.py. Everything that registers runs in a subprocess:
other tests assert the registries' exact contents.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "aeparts.py"
RunFn = Callable[..., subprocess.CompletedProcess]  # the run_py / train fixtures



def example_config(tmp: Path, shards: Path, name: str, **top: object) -> Path:
    """A tiny run that uses all five entries of examples/aeparts.py through the config alone."""
    cfg = {
        **top,
        "run": {"name": name, "dir": str(tmp / "runs")},
        "data": {"shards": str(shards), "batch_size": 32, "eval_batch_size": 64},
        "model": {"name": "tiny_mlp_ae", "latent_dim": 4, "params": {"width": 32}},
        "loss": {"name": "huber"},
        "corruption": [{"invert": {"p": 0.5}}],
        "train": {"epochs": 1, "max_steps": 2, "compile": False},
        "log": {"wandb": "disabled", "every": 1, "probe_size": 16},
        "eval": {"metrics": ["mse", "mae"], "knn_train": 64},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- no import cycle


def test_config_imports_no_registry_and_run_dir_ignores_import(tmp_path: Path, run_py: RunFn) -> None:
    # aedist.config is the schema; the registries import it for its types, so it must not import them.
    check = ("import sys, aedist.config, aedist.loading, aedist.extensions\n"
             "bad = [m for m in sys.modules if m.startswith(('aedist.models', 'aedist.losses', 'aedist.objectives', "
             "'aedist.data', 'aedist.evaluation', 'aedist.metrics', 'torch'))]\n"
             "assert not bad, bad\n")
    proc = run_py(["-c", check])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # slurm/train.sbatch asks aedist.config for the run folder with train.py's arguments, --import included.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{dir: {tmp_path}, name: r}}\nimports: [no_such_module]\n")
    proc = run_py(["-m", "aedist.config", "--run-dir", str(cfg), "train.epochs=2", "--import", "nope.py", "--import=x.y"])
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "r"), proc.stderr[-2000:]


# ----------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("source, arg, words", [
    (None, "no_such_pkg.parts", ["--import: no module named 'no_such_pkg'", "PYTHONPATH", "./no_such_pkg/parts.py"]),
    (None, "./nope.py", ["--import: file './nope.py' not found", "relative paths are read from the current folder"]),
    ("x = 1\nraise RuntimeError('boom')\n", "FILE", ["ext.py:2 with RuntimeError: boom", "fix it"]),
    ("def f(:\n    pass\n", "FILE", ["has a syntax error at", "ext.py:1"]),
    ("import not_a_real_dep_xyz\n", "FILE", ["ext.py:1 with ModuleNotFoundError", "pip install not_a_real_dep_xyz"]),
    ("from aedist.losses import LOSSES\nLOSSES.register('mse')(lambda p, t: p)\n", "FILE",
     ["ext.py:2 with ValueError: loss 'mse' is registered twice; pick another name"]),
    (None, "my-parts", ["neither a module name", "nor a .py file"]),
], ids=["missing-module", "missing-file", "raises", "syntax-error", "missing-dependency", "duplicate-name", "bad-name"])
def test_bad_import_is_one_line_exit_2(source: str | None, arg: str, words: list[str], tmp_path: Path, run_py: RunFn) -> None:
    if source is not None:
        (tmp_path / "ext.py").write_text(source)
        arg = str(tmp_path / "ext.py")
    proc = run_py(["launch/train.py", "--config", "configs/debug.yaml", "--import", arg, f"run.dir={tmp_path}"])
    one_line_error(proc, *words)
    assert not (tmp_path / "debug").exists()  # refused before the run folder exists


def test_config_imports_error_names_the_config_key(tmp_path: Path, run_py: RunFn) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"imports: [./gone.py]\nrun: {{dir: {tmp_path}}}\n")
    one_line_error(run_py(["launch/train.py", "--config", str(cfg)]), "config key 'imports': file './gone.py' not found")


def test_recorded_import_that_is_gone_stops_evaluate_and_report(tmp_path: Path, run_py: RunFn) -> None:
    run = tmp_path / "runs" / "moved"
    run.mkdir(parents=True)
    gone = tmp_path / "parts" / "gone.py"
    (run / "config.yaml").write_text(yaml.safe_dump({"imports": [str(gone)], "run": {"name": "moved", "dir": str(run.parent)}}))
    recorded = f"imports recorded in {run / 'config.yaml'}: file '{gone}' not found"
    one_line_error(run_py(["launch/evaluate.py", str(run), "--no-wandb"]), recorded)
    one_line_error(run_py(["launch/report.py", str(run), "--out", str(tmp_path / "R.md")]), recorded)
    assert not (tmp_path / "R.md").exists()


# ----------------------------------------------------------------------------- module names, imported once


def test_dotted_module_from_the_current_folder_and_one_file_imported_once(tmp_path: Path, run_py: RunFn) -> None:
    pkg = tmp_path / "my_project"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "aeparts.py").write_text("from aedist.models import MODELS, register_model\n"
                                    "register_model('pkg_ae')(MODELS.get('mlp_ae').build)\n")
    # my_project is found in the current folder. The example is named four ways (relative, absolute, as a
    # module through PYTHONPATH, and in the config): registered once, or the second time would fail.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"imports: [my_project.aeparts, {EXAMPLE}]\nmodel: {{name: pkg_ae}}\nloss: {{name: huber}}\n")
    proc = run_py(["-m", "aedist.models", str(cfg), "--import", "examples.aeparts", "--import", os.path.relpath(EXAMPLE, tmp_path)],
                  cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "total params" in proc.stdout, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- accelerate launch, evaluate, resume, report


@pytest.mark.slow
def test_two_processes_train_with_the_example_then_evaluate_resume_and_report_elsewhere(
        tmp_path: Path, tiny_shards: Path, train: RunFn, run_py: RunFn) -> None:
    # The config names the example relatively and --import names it again: imported (registered) once per rank.
    cfg = example_config(tmp_path, tiny_shards, "ext", imports=["examples/aeparts.py"])
    proc = train(cfg, "--import", "examples/aeparts.py", procs=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "ext"
    summary = json.loads((run / "summary.json").read_text())
    assert {"test/mae", "test/mse"} <= set(summary) and summary["step"] == 2, summary
    assert (run / "figures" / "first_recon_epoch000.png").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["imports"] == [str(EXAMPLE)]  # absolute: found from anywhere

    # From another folder, without --import: evaluate.py imports what config.yaml recorded.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_py([str(ROOT / "launch/evaluate.py"), str(run), "--no-wandb"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "test/mae" in json.loads((run / "eval.json").read_text())

    # A resume from there with a config that no longer names it (a requeued job, a forgotten flag) repeats it.
    plain = yaml.safe_load(cfg.read_text())
    del plain["imports"]
    plain["train"]["max_steps"] = 4
    (elsewhere / "ext.yaml").write_text(yaml.safe_dump(plain))
    proc = run_py([str(ROOT / "launch/train.py"), "--config", "ext.yaml"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["resumed_from"] == [2], summary
    assert yaml.safe_load((run / "config.yaml").read_text())["imports"] == [str(EXAMPLE)]

    # report.py imports the runs' recorded extensions (a broken one would stop it: the test above).
    proc = run_py([str(ROOT / "launch/report.py"), str(run), "--out", str(elsewhere / "R.md")], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ext" in (elsewhere / "R.md").read_text()
