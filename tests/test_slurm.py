"""The SLURM scripts on a real one-node cluster: preempt a 2-process CPU run, see it requeue and resume.

    pytest -m slow tests/test_slurm.py     # as root, with slurmctld, slurmd, slurm-client and munge

The cluster (tests/slurm_cluster.py) is started once for the module and its daemons are stopped by
pid at the end. The training job is the project's own slurm/train_cpu.sbatch, submitted with sbatch
from the repository root exactly as the README says; the uninterrupted reference run is a plain
``python launch/train.py`` with the same config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, unavailable_reason  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Stand-ins for srun, scontrol and accelerate that print what they were asked to run: the launch
# line of train.sbatch for any node count, without a cluster. The fake srun runs its command once per
# node with that node's SLURM_NODEID, as the real one does with one task per node.
_FAKES = {
    "srun": """#!/bin/bash
echo "srun $(printf '%s ' "$@" | grep -o -- '--[a-z-]*=[^ ]*' | tr '\\n' ' ')"
while [[ $1 == --* ]]; do shift; done
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@"; done
""",
    "scontrol": "#!/bin/bash\n[[ $1 == show ]] && printf 'gpu-a\\ngpu-b\\n'\n",
    "accelerate": "#!/bin/bash\nprintf 'accelerate'; printf ' <%s>' \"$@\"; echo\n",
}


def _dry_run(tmp_path: Path, env: dict[str, str], *args: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in _FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{dir: {tmp_path / 'runs'}, name: dry}}\n")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                "AEDIST_PYTHON": sys.executable, "SLURM_JOB_ID": "42", **env}
    r = subprocess.run(["bash", "slurm/train.sbatch", str(cfg), *args], cwd=REPO, env=full_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr  # the fakes train nothing: "failed, not requeued"
    return (tmp_path / "runs" / "dry" / "slurm-42.out").read_text()


def test_train_sbatch_multinode_launch_line(tmp_path: Path) -> None:
    env = {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_CPUS_PER_TASK": "8"}
    out = _dry_run(tmp_path, env, "optim.lr=3e-4", "log.tags=[a b]")
    launches = [line for line in out.splitlines() if line.startswith("accelerate")]
    assert len(launches) == 2, out
    for rank, line in enumerate(launches):
        assert line.startswith(f"accelerate <launch> <--machine_rank> <{rank}> <--multi_gpu>"), line
        for want in ("<--num_processes> <8>", "<--num_machines> <2>", "<--main_process_ip> <gpu-a>",
                     "<launch/train.py> <--config>", "<optim.lr=3e-4> <log.tags=[a b]>"):
            assert want in line, (want, line)
    assert "--ntasks-per-node=1" in out and "--cpus-per-task=8" in out, out


def test_train_sbatch_cpu_switch(tmp_path: Path) -> None:
    out = _dry_run(tmp_path, {"SLURM_NNODES": "1", "AEDIST_CPU_PROCS": "2"})
    (line,) = [line for line in out.splitlines() if line.startswith("accelerate")]
    assert "<--multi_gpu> <--num_processes> <2>" in line and "<train.cpu=true>" in line, line
    assert "<--main_process_ip> <127.0.0.1>" in line, line


def test_train_sbatch_gpus_off_means_cpu(tmp_path: Path) -> None:
    # `sbatch --nodes=2 --gpus-per-node=0 slurm/train.sbatch` on a CPU partition: SLURM says 0 GPUs per
    # node, which alone switches to 1 gloo process per node (the real two-node run: test_multinode.py).
    env = {"SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "0", "SLURM_JOB_NODELIST": "cpu-[a-b]", "AEDIST_CPU_PROCS": ""}
    out = _dry_run(tmp_path, env)
    launches = [line for line in out.splitlines() if line.startswith("accelerate")]
    assert len(launches) == 2 and "2 node(s) x 1 process(es)" in out, out
    for rank, line in enumerate(launches):
        assert line.startswith(f"accelerate <launch> <--machine_rank> <{rank}> <--multi_gpu>"), line
        for want in ("<--num_processes> <2>", "<--num_machines> <2>", "<--main_process_ip> <gpu-a>", "<train.cpu=true>"):
            assert want in line, (want, line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = unavailable_reason()  # only "not root" or "binaries missing"
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    c = SlurmCluster(root)
    # The job runs the interpreter and `accelerate` of this test session, whatever PATH CI has.
    c.env["PATH"] = f"{Path(sys.executable).parent}:{c.env['PATH']}"
    c.env["AEDIST_PYTHON"] = sys.executable
    c.env["WANDB_MODE"] = "offline"
    c.env["WANDB_SILENT"] = "true"
    with c:
        yield c


def _shards(out: Path) -> Path:
    from aedist.data import write_shards

    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n).astype(np.int64)
        x = rng.integers(0, 60, (n, 1, 28, 28)).astype(np.uint8)
        x[y == 1, :, 8:20, 8:20] += 180  # two visibly different classes; enough for any probe/kNN step
        return x, y

    write_shards(out, {"train": split(8192), "val": split(256), "test": split(256)}, class_names=["dark", "square"],
                 samples_per_block=128)
    return out


def _config(tmp: Path, shards: Path) -> Path:
    cfg = tmp / "tiny.yaml"
    cfg.write_text(
        f"""
run: {{dir: {tmp / 'runs'}, name: slurm}}
data: {{shards: {shards}, batch_size: 32, eval_batch_size: 256, shuffle_buffer: 512}}
model: {{name: conv_ae, image_size: 28, latent_dim: 2}}
train: {{epochs: 4, checkpoint_every: 25, keep_last: 2}}
log: {{wandb: offline, every: 10, probe_size: 16}}
eval: {{knn_train: 256}}
"""
    )
    return cfg


def _wandb_ids(run_dir: Path) -> list[str]:
    """Run ids of the offline W&B folders ``offline-run-DATE_TIME-ID`` (one per attempt)."""
    return [m.group(1) for d in sorted((run_dir / "wandb").glob("offline-run-*"))
            if (m := re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+)", d.name))]


def _checkpoint_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id stored in the newest complete checkpoint (None while there is none)."""
    from aedist.checkpoint import newest_checkpoint, read_state

    for _ in range(10):  # the trainer keeps only the last few: one may vanish while we read it
        try:
            ckpt = newest_checkpoint(run_dir / "checkpoints")
            return read_state(ckpt).wandb_run_id if ckpt else None
        except FileNotFoundError:
            time.sleep(0.1)
    raise AssertionError("checkpoints kept vanishing while being read")


def _wait(ok, timeout: float, what: str, cluster: SlurmCluster, job: str, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ok():
            return
        state = cluster.job(job)
        if state.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        # SLURM holds a requeued batch job back (BeginTime ~2 min ahead); let it start once the node
        # has cleaned up the previous attempt and a few seconds have passed (a start in the second the
        # old credential was revoked is refused by slurmd: "Job N already killed").
        cluster.release_requeued(job)
        time.sleep(0.5)
    logs = log.read_text(errors="replace")[-6000:] if log.exists() else "(no job log)"
    raise AssertionError(f"timed out waiting for {what}; job: {cluster.job(job)}\n--- job log\n{logs}\n{cluster.logs()}")


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes(cluster: SlurmCluster, tmp_path: Path) -> None:
    if not (REPO / "launch" / "train.py").exists():
        pytest.fail("launch/train.py is missing")
    cfg = _config(tmp_path, _shards(tmp_path / "shards"))
    run_dir = tmp_path / "runs" / "slurm"

    job = cluster.sbatch(["--output", str(tmp_path / "sbatch-%j.out"), "slurm/train_cpu.sbatch", str(cfg)], cwd=REPO)
    log = run_dir / f"slurm-{job}.out"

    # Mid-run: a checkpoint exists and training is still going.
    _wait(lambda: _checkpoint_wandb_id(run_dir) is not None, 120, "the first checkpoint", cluster, job, log)
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be preempted; make it longer"
    ids_before = set(_wandb_ids(run_dir))
    assert len(ids_before) == 1, f"expected one W&B run before preemption, found {ids_before}"
    assert {_checkpoint_wandb_id(run_dir)} == ids_before, (_checkpoint_wandb_id(run_dir), ids_before)

    # What SLURM does 120 s before a time limit (--signal=B:USR1@120): USR1 to the batch shell only.
    r = cluster.scancel("--signal=USR1", "--batch", job)
    assert r.returncode == 0, r.stderr

    # Meanwhile the uninterrupted reference: same config, another run name, one plain process. One
    # intra-op thread, as torchrun gives each of the job's processes: on 2 cores shared with them, two
    # threads spinning against each other make it ~10x slower.
    plain = subprocess.Popen([sys.executable, "launch/train.py", "--config", str(cfg), "run.name=plain"],
                             cwd=REPO, env=dict(cluster.env, OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: int(cluster.job(job).get("Restarts", "0")) >= 1, 60, "the requeue", cluster, job, log)
        _wait(lambda: cluster.job(job).get("JobState") == "COMPLETED", 150, "the requeued job to finish",
              cluster, job, log)
        out, _ = plain.communicate(timeout=150)
    finally:
        if plain.poll() is None:
            plain.kill()
    assert plain.returncode == 0, out[-4000:]

    text = log.read_text(errors="replace")  # a killed step may cut a progress bar mid-character
    assert "got USR1" in text and "requeueing job" in text, text[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((tmp_path / "runs" / "plain" / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["resumed_from"] and min(summary["resumed_from"]) > 0, summary  # not from step 0
    assert reference["resumed_from"] == []
    assert summary["step"] == reference["step"], (summary, reference)
    # One W&B run across both attempts: the id before the requeue is the id after it.
    assert summary["wandb_run_id"] in ids_before, (summary["wandb_run_id"], ids_before)
    ids_after = _wandb_ids(run_dir)
    assert len(ids_after) >= 2 and set(ids_after) == ids_before, ids_after
    assert sorted(run_dir.glob("slurm-*.out")) == [log]  # the job's output went to the run folder


@pytest.mark.slow
def test_job_trains_with_an_extension_from_examples(cluster: SlurmCluster, tmp_path: Path, tiny_shards: Path) -> None:
    # Issue 27: a user's model, loss, metric, corruption and figure reach the job's 2 processes through
    # `--import`, passed after the config like any override; config.yaml records the file for a requeue.
    example = REPO / "examples" / "aeparts.py"
    cfg = tmp_path / "ext.yaml"
    cfg.write_text(
        f"""
run: {{dir: {tmp_path / 'runs'}, name: ext}}
data: {{shards: {tiny_shards}, batch_size: 32, eval_batch_size: 64}}
model: {{name: tiny_mlp_ae, latent_dim: 4, params: {{width: 32}}}}
loss: {{name: huber}}
corruption: [{{invert: {{p: 0.5}}}}]
train: {{epochs: 1, max_steps: 2}}
log: {{wandb: disabled, every: 1, probe_size: 16}}
eval: {{metrics: [mse, mae], knn_train: 64}}
"""
    )
    run_dir = tmp_path / "runs" / "ext"
    job = cluster.sbatch(["--output", str(tmp_path / "sbatch-%j.out"), "slurm/train_cpu.sbatch", str(cfg),
                          "--import", "examples/aeparts.py"], cwd=REPO)
    log = run_dir / f"slurm-{job}.out"
    _wait(lambda: cluster.job(job).get("JobState") == "COMPLETED", 180, "the job to finish", cluster, job, log)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True and {"test/mae", "test/mse"} <= set(summary), summary
    assert (run_dir / "figures" / "first_recon_epoch000.png").exists()
    assert f"imports:\n- {example}\n" in (run_dir / "config.yaml").read_text()
    assert "1 node(s) x 2 process(es)" in log.read_text(errors="replace")
