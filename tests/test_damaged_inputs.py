"""Damaged inputs (issue 25 item 10), as classes: every file the toolkit reads back (a checkpoint's
state.json, data position and weights, a run's config.yaml, eval.json, summary.json, an image folder) and
every number a user passes is checked where it enters. A damaged checkpoint is skipped with one warning line
by train.py and evaluate.py alike (one fallback path: aedist.checkpoint.newest_usable); anything else is one
line on stderr naming the problem and the fix, exit 2, no traceback. Each test runs the entry scripts."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error

RunFn = Callable[..., subprocess.CompletedProcess]  # the run_py / train fixtures

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path) -> Path:
    """A finished tiny run ``runs/r`` with checkpoints step-2 and step-4 (and best), EMA on, so every file
    kind a checkpoint can hold is there (custom_checkpoint_0.pkl is the EMA)."""
    from conftest import _run_py

    tmp = tmp_path_factory.mktemp("finished")
    cfg = {"run": {"name": "r", "dir": str(tmp / "runs")}, "data": {"shards": str(tiny_shards), "batch_size": 64, "eval_batch_size": 64},
           "model": {"channels": [8, 16, 32], "latent_dim": 4},
           "train": {"epochs": 2, "seed": 3, "max_steps": 4, "checkpoint_every": 2, "keep_last": 2, "ema_decay": 0.9},
           "log": {"wandb": "disabled", "every": 1, "probe_size": 16}, "eval": {"knn_train": 64}}
    (tmp / "r.yaml").write_text(yaml.safe_dump(cfg))
    proc = _run_py(["launch/train.py", "--config", str(tmp / "r.yaml")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp / "runs/r/checkpoints/step-4").iterdir())
    assert files == ["COMPLETE", "custom_checkpoint_0.pkl", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "state.json"]
    return tmp / "runs"


def copy_run(finished: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of the finished run under ``tmp`` and a config to resume it with (its own config.yaml)."""
    runs = tmp / "runs"
    shutil.copytree(finished, runs)
    run = runs / "r"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["run"]["dir"] = str(runs)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp / "r.yaml").write_text(yaml.safe_dump(cfg))
    return run, tmp / "r.yaml"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _state(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        change(state)
        (folder / "state.json").write_text(json.dumps(state))
    return damage


def _position(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(state: dict) -> None:
        assert state["data_position"], "step-4 is mid-epoch: it records a data position"
        change(state["data_position"])
    return _state(edit)


def _state_dir(folder: Path) -> None:
    (folder / "state.json").unlink()
    (folder / "state.json").mkdir()


# name: (damage to step-4, train.py skips it, evaluate.py skips it). evaluate.py reads state.json, the model
# and the EMA only: a damaged optimizer or RNG state does not concern it.
CHECKPOINT_DAMAGE: dict[str, tuple[Callable[[Path], None], bool, bool]] = {
    "state-empty": (lambda f: (f / "state.json").write_text(""), True, True),
    "state-invalid-json": (lambda f: (f / "state.json").write_text("{not json"), True, True),
    "state-a-list": (lambda f: (f / "state.json").write_text("[1, 2]"), True, True),
    "state-a-folder": (_state_dir, True, True),
    "state-missing-step": (_state(lambda s: s.pop("step")), True, True),
    "state-step-a-string": (_state(lambda s: s.update(step="x")), True, True),
    "state-step-negative": (_state(lambda s: s.update(step=-5)), True, True),
    "state-step-not-the-folders": (_state(lambda s: s.update(step=3)), True, True),
    "state-epoch-a-bool": (_state(lambda s: s.update(epoch=True)), True, True),
    "state-world-sizes-a-string": (_state(lambda s: s.update(world_sizes="ab")), True, True),
    "state-model-hash-a-number": (_state(lambda s: s.update(model_hash=5)), True, True),
    "state-best-val-nan": (_state(lambda s: s.update(best_val=float("nan"))), True, True),
    "position-a-list": (_state(lambda s: s.update(data_position=[1])), True, True),
    "position-missing-field": (_position(lambda p: p.pop("seed")), True, True),
    "position-consumed-past-span": (_position(lambda p: p["layouts"][0].update(consumed=10**6)), True, True),
    "position-shuffle-a-string": (_position(lambda p: p.update(shuffle="yes")), True, True),
    "model-truncated": (lambda f: _truncate(f / "model.safetensors"), True, True),
    "model-deleted": (lambda f: (f / "model.safetensors").unlink(), True, True),
    "optimizer-truncated": (lambda f: _truncate(f / "optimizer.bin"), True, False),
    "rng-truncated": (lambda f: _truncate(f / "random_states_0.pkl"), True, False),  # Accelerate alone would skip it silently
    "ema-truncated": (lambda f: _truncate(f / "custom_checkpoint_0.pkl"), True, True),  # evaluate.py alone would use raw weights
    "state-unknown-key": (_state(lambda s: s.update(written_by_a_newer_aedist=1)), False, False),  # ignored: documented
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_every_damage_is_caught_where_train_and_evaluate_read_a_checkpoint(damage: str, finished: Path, tmp_path: Path) -> None:
    # In-process, every variant: the checks both scripts run before loading anything, by the one fallback path.
    from aedist.checkpoint import newest_usable, verify_checkpoint
    from aedist.config import config_from_dict, read_yaml
    from aedist.evaluation.run import load_checkpoint_weights

    run, _ = copy_run(finished, tmp_path)
    fn, train_skips, eval_skips = CHECKPOINT_DAMAGE[damage]
    fn(run / "checkpoints" / "step-4")
    cfg = config_from_dict(read_yaml(run / "config.yaml", "run config"))
    warned: list[str] = []
    state, _, ema, folder = load_checkpoint_weights(cfg, run, None, "auto", "cpu", warned.append)
    assert (folder.name, state.step, ema, len(warned)) == (("step-2", 2) if eval_skips else ("step-4", 4)) + (True, int(eval_skips))
    warned.clear()
    _, folder = newest_usable(run / "checkpoints", lambda f: verify_checkpoint(f, cfg.model_hash()), warned.append, "fix")
    assert (folder.name, len(warned)) == ("step-2" if train_skips else "step-4", int(train_skips))


# Through the real scripts, one variant of each kind of damage (the in-process test above covers every one).
END_TO_END = ["state-invalid-json", "state-step-a-string", "position-missing-field", "model-deleted", "optimizer-truncated",
              "rng-truncated", "ema-truncated", "state-unknown-key"]


@pytest.mark.parametrize("damage", END_TO_END)
def test_damaged_newest_checkpoint_falls_back_in_train_and_evaluate(damage: str, finished: Path, tmp_path: Path,
                                                                    train: RunFn, run_py: RunFn) -> None:
    run, cfg = copy_run(finished, tmp_path)
    newest = run / "checkpoints" / "step-4"
    fn, train_skips, eval_skips = CHECKPOINT_DAMAGE[damage]
    fn(newest)
    warning = f"warning: checkpoint {newest} is damaged ("

    ev = run_py(["launch/evaluate.py", str(run), "--no-wandb"])
    assert ev.returncode == 0 and "Traceback" not in ev.stderr, ev.stderr[-3000:]
    assert ev.stdout.count(warning) == int(eval_skips), ev.stdout
    result = json.loads((run / "eval.json").read_text())
    assert result["checkpoint_step"] == (2 if eval_skips else 4)
    assert result["weights"] == "ema"  # never the raw weights in silence

    tr = train(cfg, "train.max_steps=6")
    assert tr.returncode == 0 and "Traceback" not in tr.stderr, tr.stderr[-3000:]
    assert tr.stdout.count(warning) == int(train_skips), tr.stdout
    assert f"resumed from {run / 'checkpoints' / ('step-2' if train_skips else 'step-4')} " in tr.stdout
    assert json.loads((run / "summary.json").read_text())["step"] == 6


def test_no_usable_checkpoint_is_one_line_for_train_and_evaluate(finished: Path, tmp_path: Path, train: RunFn, run_py: RunFn) -> None:
    run, cfg = copy_run(finished, tmp_path)
    (run / "checkpoints/step-4/state.json").write_text("{not json")
    _truncate(run / "checkpoints/step-2/model.safetensors")
    ev = run_py(["launch/evaluate.py", str(run), "--no-wandb"])
    one_line_error(ev, "no usable checkpoint", "all 2 damaged")
    assert ev.stdout.count("is damaged (") == 2
    one_line_error(train(cfg, "train.max_steps=6"), "no usable checkpoint", "all 2 damaged", "train.resume=never")


def _file(run: Path) -> str:
    (run / "checkpoints" / "afile").write_text("x")
    return "afile"


def _half_written(run: Path) -> str:
    shutil.copytree(run / "checkpoints/step-4", run / "checkpoints/step-9")
    (run / "checkpoints/step-9/COMPLETE").unlink()
    return "step-9"


def _damaged(run: Path) -> str:
    (run / "checkpoints/step-4/state.json").write_text("[]")
    return "step-4"


@pytest.mark.parametrize("name, words", [
    ("../x", ["plain name of a folder", "pass one of: best, step-2, step-4"]),
    ("/abs", ["plain name of a folder"]),
    ("", ["plain name of a folder"]),
    (".", ["plain name of a folder"]),
    ("step-4/", ["plain name of a folder"]),
    ("step-999", ["no checkpoint folder", "pass one of: best, step-2, step-4"]),
    (_file, ["no checkpoint folder"]),
    (_half_written, ["incomplete"]),
    (_damaged, ["step-4 is damaged (state.json: a JSON list", "pass another --checkpoint"]),  # named: no silent fallback
])
def test_evaluate_checkpoint_name_is_checked_in_one_line(name: str | Callable[[Path], str], words: list[str], finished: Path,
                                                         tmp_path: Path, run_py: RunFn) -> None:
    run, _ = copy_run(finished, tmp_path)
    value = name(run) if callable(name) else name
    proc = run_py(["launch/evaluate.py", str(run), "--no-wandb", "--checkpoint", value])
    one_line_error(proc, "--checkpoint", *words)
    assert not (run / f"eval_{value}.json").exists()


@pytest.mark.parametrize("file, text, command, words", [
    ("config.yaml", "train: [unclosed", "evaluate", ["is not valid YAML", "config.yaml"]),
    ("config.yaml", "- a list\n", "evaluate", ["must hold a mapping", "config.yaml"]),
    ("config.yaml", "trian: {epochs: 2}\n", "evaluate", ["unknown config key 'trian'", "did you mean 'train'"]),
    ("config.yaml", "data: {cache_max_gb: .inf}\n", "evaluate", ["data.cache_max_gb", "finite"]),
    ("config.yaml", "train: [unclosed", "report", ["is not valid YAML", "config.yaml"]),
    ("eval.json", "{\"test/mse\": ", "report", ["eval.json is not valid JSON", "launch/evaluate.py"]),
    ("eval.json", "[1, 2]", "report", ["eval.json must hold a JSON object", "launch/evaluate.py"]),
    ("summary.json", "", "report", ["summary.json is not valid JSON"]),
])
def test_damaged_run_file_is_one_line(file: str, text: str, command: str, words: list[str], finished: Path, tmp_path: Path,
                                      run_py: RunFn) -> None:
    run, _ = copy_run(finished, tmp_path)
    (run / file).write_text(text)
    args = (["launch/evaluate.py", str(run), "--no-wandb"] if command == "evaluate"
            else ["launch/report.py", str(run), "--out", str(tmp_path / "R.md")])
    one_line_error(run_py(args), *words)


def _read_only(folder: Path) -> Callable[[], None]:
    """Make ``folder`` read-only even for root (who ignores chmod): a read-only bind mount of it onto
    itself, else ``chattr -R +i``; returns the undo. Skips where neither is allowed (not root, a container
    without CAP_SYS_ADMIN and a file system without attributes)."""
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mounted.returncode == 0:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode == 0:
            return lambda: subprocess.run(["umount", str(folder)], check=True)
        subprocess.run(["umount", str(folder)], check=True)
    if subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)
    pytest.skip("cannot make a folder read-only for this user here (no bind mount, no chattr)")


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_read_only_run_folder_is_one_line(command: str, finished: Path, tmp_path: Path, train: RunFn, run_py: RunFn) -> None:
    run, cfg = copy_run(finished, tmp_path)
    undo = _read_only(run)
    try:
        proc = train(cfg, "train.max_steps=6") if command == "train" else run_py(["launch/evaluate.py", str(run), "--no-wandb"])
    finally:
        undo()
    one_line_error(proc, f"run folder {run} is not writable", "writable")
    assert json.loads((run / "summary.json").read_text())["step"] == 4  # nothing was half done


@pytest.mark.parametrize("override, words", [
    ("data.cache_max_gb=inf", ["data.cache_max_gb", "must be a finite number"]),
    ("data.cache_max_gb=.inf", ["data.cache_max_gb", "must be a finite number"]),
    ("data.cache_max_gb=1e400", ["data.cache_max_gb", "must be a finite number"]),
    ("data.cache_max_gb=nan", ["data.cache_max_gb"]),
    ("optim.lr=.nan", ["optim.lr"]),
    ("train.collective_timeout_s=inf", ["train.collective_timeout_s", "must be a finite number"]),
    ("run.name=a|b", ["run.name", "'|'", "use letters, digits"]),
    ("run.name=a`b", ["run.name", "'`'"]),
    ("run.name=a*b", ["run.name", "'*'"]),
    ('run.name="a\\nb"', ["run.name", "'\\n'"]),  # YAML's escape: a real newline
])
def test_config_value_that_cannot_work_is_one_line(override: str, words: list[str], tmp_path: Path, tiny_shards: Path, train: RunFn) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "runs")}, "data": {"shards": str(tiny_shards)}}))
    one_line_error(train(cfg, override), *words)
    assert not (tmp_path / "runs").exists()


def test_report_escapes_a_run_folder_name_that_would_break_its_table(finished: Path, tmp_path: Path, run_py: RunFn) -> None:
    # run.name refuses these characters, but a folder can still be renamed to anything by hand.
    run, _ = copy_run(finished, tmp_path)
    odd = run.rename(run.parent / "a|b`c*d e")
    proc = run_py(["launch/report.py", str(odd), "--out", str(tmp_path / "R.md")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in (tmp_path / "R.md").read_text().splitlines() if line.startswith("|")]
    head, row = table[0], table[2]
    assert row.startswith("| a\\|b\\`c\\*d e |")
    assert row.replace("\\|", "").count("|") == head.count("|")  # the row has as many cells as the header


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    import numpy as np
    from PIL import Image

    src = tmp_path / "photos"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(src / c / f"{i}.png")
    return src


@pytest.mark.parametrize("args, words", [
    (["--size", "0"], ["--size 0", "4..4096", "--size 96"]),
    (["--size", "-3"], ["--size -3", "4..4096"]),
    (["--size", "100000"], ["--size 100000", "4..4096"]),
    (["--size", "2048"], ["--samples-per-block 1024 at --size 2048", "pass --samples-per-block 170 or less"]),
    (["--task-index", "2", "--task-count", "2"], ["--task-index 2 must be in 0..1", "--task-count K+1"]),
    (["--task-index", "-1"], ["--task-index -1 must be in 0..0"]),
    (["--task-count", "0"], ["--task-count 0", ">= 1"]),
    (["--workers", "-1"], ["--workers -1", "0: the CPUs available"]),
    (["--samples-per-block", "0"], ["--samples-per-block 0", ">= 1"]),
    (["--seed", "-1"], ["--seed -1", ">= 0"]),
    (["--val-fraction", "nan"], ["--val-fraction", "[0, 1)"]),
])
def test_pack_numbers_that_cannot_work_are_one_line(args: list[str], words: list[str], image_folder: Path, tmp_path: Path,
                                                    run_py: RunFn) -> None:
    out = tmp_path / "out"
    one_line_error(run_py(["launch/pack.py", "folder", "--source", str(image_folder), "--out", str(out), *args]), *words)
    assert not out.exists()  # checked before anything is written


@pytest.mark.parametrize("links", [
    {"cat/loop": ".", "cat/loop.png": "."},  # a link to its own folder, one with an image suffix
    {"cat/self.png": "self.png"},  # a link to itself: ELOOP
    {"cat/gone.png": "nowhere.png"},  # dangling
    {"again": "."},  # a class folder that links back to the root
    {"cat/up": "..", "dog/x.jpg": "../dog/x.jpg"},
])
def test_symlink_loops_and_dangling_links_in_an_image_folder_are_left_out(links: dict[str, str], image_folder: Path, tmp_path: Path,
                                                                         run_py: RunFn) -> None:
    for name, target in links.items():
        (image_folder / name).symlink_to(target)
    out = tmp_path / "out"
    proc = run_py(["launch/pack.py", "folder", "--source", str(image_folder), "--out", str(out), "--size", "8", "--val-fraction", "0",
                   "--test-fraction", "0"], timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog"] and manifest["splits"]["train"]["num_samples"] == 6
    broken = [n for n in links if n.endswith((".png", ".jpg")) or n == "again"]
    if broken:
        assert f"warning: left out {len(broken)} symbolic link(s) in {image_folder} that dangle or loop" in proc.stderr
