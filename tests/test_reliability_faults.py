"""Faults from outside the trainer, part of issue 25 (items 6, 7, 11): W&B's service killed mid-run, a rank
that stops arriving (SIGSTOP), and user errors under `accelerate launch` (on every rank, or on one). All
through the real launcher, the real W&B service and real gloo processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ACCEL_2
from test_engine import write_config

from aedist.config import load_config
from aedist.errors import UserError
from aedist.resume import RunLock

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **extra}


def _lines(stderr: str, start: str) -> list[str]:
    """Lines holding ``start``, cut to begin there: a progress bar redraws its line with \\r and leaves it
    open, so a line printed mid-run may share it. The launcher's failure table (``traceback : LINE``) is
    not a line a worker printed."""
    return [seg[seg.index(start):] for seg in re.split(r"[\r\n]", stderr) if start in seg and "traceback : " not in seg]


def _long_run(tmp: Path, shards: Path, name: str, **log: object) -> Path:
    """Hundreds of small steps, a checkpoint every 20: long enough to break in after the first checkpoint."""
    return write_config(tmp, shards, name, data={"batch_size": 32}, train={"epochs": 40, "checkpoint_every": 20, "eval_every": 1000},
                        log={"wandb": "disabled", "every": 2, "figures_every": 1000, "probe_size": 16, **log})


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- item 6: tracking lost mid-run


def test_wandb_service_killed_mid_run_is_one_warning_and_recorded(tmp_path: Path, tiny_shards: Path) -> None:
    cfg = _long_run(tmp_path, tiny_shards, "lost", wandb="offline")
    run = tmp_path / "runs/lost"
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", str(cfg)], cwd=ROOT, env=_env(WANDB_SILENT="false"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "checkpoints/step-20/COMPLETE", proc)
        service = [p for p in psutil.Process(proc.pid).children(recursive=True) if "wandb-core" in " ".join(p.cmdline())]
        assert service, "no W&B service process under the trainer"
        for p in service:
            p.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    (warning,) = _lines(err, "warning: the trackers failed")
    assert "Traceback" not in out + err and "socket.send() raised exception" not in err, err[-3000:]
    lost_at = int(re.search(r"wandb is lost from step (\d+)", warning).group(1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["step"] == 320
    assert summary["tracker_lost"] == {"wandb": lost_at} and lost_at >= 20
    # metrics.jsonl is complete: every logged step once, before and after the loss
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(2, 321, 2))
    assert list((run / "wandb").glob("offline-run-*"))


# W&B's service dies after the last log call: nothing raises, and summary.json must still say so.
SILENT_DEATH = """
import signal, sys
import psutil
from accelerate import Accelerator
from aedist.config import load_config
from aedist.tracking import Tracker, trackers_for
cfg = load_config(sys.argv[1], [f"run.dir={sys.argv[2]}", "run.name=silent", "log.wandb=offline"])
tracker = Tracker(Accelerator(cpu=True, log_with=trackers_for(cfg)), cfg, "silent01")
tracker.log({"train/loss": 1.0}, step=7, epoch=0)
assert tracker.health() == {"tracker_lost": {}}
service = [p for p in psutil.Process().children(recursive=True) if "wandb-core" in " ".join(p.cmdline())]
assert service, "no W&B service process found"
for p in service:
    p.send_signal(signal.SIGKILL)
psutil.wait_procs(service, timeout=30)
print("health", tracker.health(), flush=True)
tracker.log({"train/loss": 0.5}, step=8, epoch=0)
print("health", tracker.health(), flush=True)
tracker.close()
"""


def test_a_dead_wandb_service_is_noticed_without_a_send(tmp_path: Path, tiny_shards: Path) -> None:
    script = tmp_path / "silent.py"
    script.write_text(SILENT_DEATH)
    proc = subprocess.run([sys.executable, str(script), str(write_config(tmp_path, tiny_shards, "silent")), str(tmp_path / "runs")],
                          cwd=ROOT, env=_env(WANDB_MODE="offline"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Noticed by looking, before any send could fail: the step is the last one sent, and stays so
    assert proc.stdout.count("health {'tracker_lost': {'wandb': 7}}") == 2, proc.stdout
    assert len(_lines(proc.stderr, "warning: the trackers failed")) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs/silent/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [7, 8]


# ----------------------------------------------------------------------------- item 7: a rank that stops arriving


def test_collective_timeout_must_be_positive() -> None:
    with pytest.raises(UserError, match="train.collective_timeout_s.*> 0"):
        load_config(None, ["train.collective_timeout_s=0"])


def test_a_stopped_rank_ends_the_job_with_124_and_one_line(tmp_path: Path, tiny_shards: Path) -> None:
    cfg = _long_run(tmp_path, tiny_shards, "stuck")
    run = tmp_path / "runs/stuck"
    proc = subprocess.Popen([sys.executable, *ACCEL_2, "launch/train.py", "--config", str(cfg), "train.collective_timeout_s=10"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: dict[str, psutil.Process] = {}
    try:
        _wait_for(run / "checkpoints/step-20/COMPLETE", proc)
        workers = {w.environ().get("RANK"): w for w in psutil.Process(proc.pid).children()}  # the launcher's workers
        assert {"0", "1"} <= set(workers), workers
        workers["0"].suspend()  # SIGSTOP the main rank: the other one must notice and say so
        stopped = time.time()
        _, err = proc.communicate(timeout=120)
        took = time.time() - stopped
    finally:
        for w in workers.values():
            try:
                w.resume()
                w.kill()
            except psutil.NoSuchProcess:
                pass
        proc.kill()
    # 10 s of waiting, then torch's elastic agent gives the stopped rank 30 s to answer SIGTERM before SIGKILL
    assert took < 10 + 30 + 30, took
    (line,) = _lines(err, "error:")
    assert line.startswith("error: rank 0 did not arrive at a collective within 10 s") and "newest checkpoint" in line, line
    assert "Timed out waiting" not in err and "[rank1]" not in err, err[-3000:]  # no gloo traceback from the worker
    # the launcher exits 1 whatever its workers' codes (README: Exit codes); the worker's 124 is in its table
    assert proc.returncode == 1 and re.search(r"exitcode\s*: 124 ", err), err[-3000:]
    assert (run / "checkpoints/step-20/COMPLETE").exists() and not (run / "summary.json").exists()


# ----------------------------------------------------------------------------- item 11: user errors under accelerate launch


def _launch(cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *ACCEL_2, "launch/train.py", "--config", str(cfg), *overrides],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_a_user_error_on_every_rank_is_one_line_and_exit_2_on_each_worker(tmp_path: Path, tiny_shards: Path) -> None:
    # data.batch_size is checked against ranks x accumulation only once the process group is up
    proc = _launch(write_config(tmp_path, tiny_shards, "odd"), "data.batch_size=63")
    (line,) = _lines(proc.stderr, "error:")
    assert line == "error: data.batch_size=63 does not divide over 2 ranks x 1 accumulation steps; use a multiple of 2"
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr, proc.stderr[-3000:]
    # Both workers exit 2, and the launcher's failure table carries the line as each one's message;
    # accelerate launch itself turns any failed worker into exit 1.
    assert len(re.findall(r"exitcode\s*: 2 ", proc.stderr)) == 2, proc.stderr[-3000:]
    assert proc.stderr.count(f"traceback : {line}") == 2
    assert proc.returncode == 1


def test_a_user_error_on_one_rank_is_its_line_and_no_traceback_from_the_other(tmp_path: Path, tiny_shards: Path) -> None:
    # Only the main rank takes the run folder's lock, so only it finds the folder in use.
    cfg = write_config(tmp_path, tiny_shards, "busy")
    lock = RunLock(tmp_path / "runs/busy")
    try:
        proc = _launch(cfg)
    finally:
        lock.release()
    (line,) = _lines(proc.stderr, "error:")
    assert line.startswith(f"error: run folder {tmp_path / 'runs/busy'} is in use by pid {os.getpid()}"), line
    (peer,) = _lines(proc.stderr, "aedist: rank 1 stops")
    assert "another rank ended" in peer
    assert "Connection closed by peer" not in proc.stderr and "[rank1]" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 2 ", proc.stderr) and f"traceback : {line}" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1
