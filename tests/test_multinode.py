"""Multi-node for real: two "machines" (network namespaces n1, n2 on a 10.x bridge, own hostnames),
gloo over that network, and a two-node SLURM cluster running the project's sbatch scripts.

    python -m pytest -q tests/test_multinode.py      # as root; skipped, with the reason, where `ip netns` cannot work

- the virtual nodes themselves: own hostnames, name resolution, no shared loopback, and clean-up by
  pid and namespace when a test fails (and of what a killed session left behind);
- every file in configs/accelerate/ parses to what its name says and ``accelerate launch
  --config_file F`` starts that many processes (the two-machine ones once per node; the CPU ones
  also form a gloo world of that size; the GPU ones only start their processes here, no NCCL);
- the README's multi-node command without SLURM (``accelerate launch --machine_rank {0,1}
  --main_process_ip ...`` on each node) ends with the same weights as 2 processes on one node, and
  each checkpoint file is written by exactly one rank;
- ``sbatch --nodes=2 slurm/train_cpu.sbatch`` survives ``scancel --signal=USR1 --batch`` and
  ``scontrol requeue`` (both nodes save the same step, the job requeues and resumes in the same W&B
  run) and ends with those same weights;
- ``sbatch --nodes=2 --gpus-per-node=0 slurm/train.sbatch`` (no GPUs: 1 gloo process per node): kill -9
  of one node's trainer ends the other node within 60 s, and the requeued job resumes from the last
  complete checkpoint.

The reference for every weight comparison is one uninterrupted 2-process run on one node
(configs/accelerate/cpu_2proc.yaml). All runs are configs/debug.yaml on the tiny shards.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import multinode  # noqa: E402
import slurm_cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
# What each launch config must say: (distributed_type, num_machines, num_processes). A new file
# fails test_accelerate_config until it is listed here.
EXPECTED = {
    "cpu_2proc.yaml": ("MULTI_GPU", 1, 2),  # MULTI_GPU = torchrun; the trainer picks CPU + gloo itself
    "cpu_2node.yaml": ("MULTI_GPU", 2, 2),
    "gpu_1.yaml": ("NO", 1, 1),
    "gpu_8.yaml": ("MULTI_GPU", 1, 8),
    "multinode.yaml": ("MULTI_GPU", 2, 16),
}
TWO_NODE_CONFIG = "cpu_2node.yaml"  # what the README's multi-node command runs on CPU machines
CHECKPOINT_FILES = {"COMPLETE", "state.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"}
EPOCHS, CKPT_EVERY = 12, 10  # 8 steps per epoch on the tiny shards at batch 32: 96 steps


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_MODE")}  # log.wandb decides
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", **extra)
    return env


def _overrides(shards: Path, run_dir: Path, name: str, wandb: str = "disabled") -> list[str]:
    """configs/debug.yaml made tiny; only the run name and W&B mode differ between runs."""
    return [f"data.shards={shards}", f"run.dir={run_dir}", f"run.name={name}", "data.batch_size=32", "data.limit=0",
            f"train.epochs={EPOCHS}", f"train.checkpoint_every={CKPT_EVERY}", "train.keep_last=2", f"train.eval_every={EPOCHS}",
            f"log.figures_every={EPOCHS}", "log.every=10", "log.probe_size=16", "eval.knn_train=64", f"log.wandb={wandb}"]


def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    summary = json.loads((run / "summary.json").read_text())
    return load_file(run / "checkpoints" / f"step-{summary['step']}" / "model.safetensors")


def _max_diff(run: Path, reference: Path) -> float:
    a, b = _final_weights(run), _final_weights(reference)
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _complete_steps(run: Path) -> list[int]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "COMPLETE").is_file())


# ------------------------------------------------------------------------------------------ fixtures


def _skip(config: pytest.Config, what: str, reason: str) -> None:
    """Skip, and say why on the terminal even under ``-q`` without ``-rs`` (CI's plain ``pytest -q``
    lists no skip reasons, and output is captured)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nSKIPPED {what}: {reason}", yellow=True)
    pytest.skip(f"{what}: {reason}")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config):
    reason = multinode.unavailable_reason()
    if reason:
        _skip(pytestconfig, "the multi-node tests", reason)
    with multinode.VirtualNodes(tmp_path_factory.mktemp("net")) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def cluster(net: multinode.VirtualNodes, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config):
    reason = slurm_cluster.unavailable_reason()
    if reason:
        _skip(pytestconfig, "the two-node SLURM tests", reason)
    c = slurm_cluster.TwoNodeCluster(tmp_path_factory.mktemp("slurm2"), net, cpus=2)
    c.env = _env(SLURM_CONF=str(c.conf), AEDIST_PYTHON=sys.executable)
    c.env["PATH"] += ":/usr/sbin:/sbin"
    with c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run everything is compared with: 2 gloo processes on one node."""
    runs = tmp_path_factory.mktemp("reference")
    cmd = ["accelerate", "launch", "--config_file", str(ACCELERATE_CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
           "launch/train.py", "--config", "configs/debug.yaml", *_overrides(tiny_shards, runs, "reference")]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((runs / "reference" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == EPOCHS * 8 and summary["resumed_from"] == [], summary
    return runs / "reference"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- the virtual nodes

SERVE = ("import socket; s = socket.create_server(('0.0.0.0', {port})); print('ready', flush=True); "
         "c, _ = s.accept(); c.sendall(b'hi from ' + socket.gethostname().encode())")
ASK = "import socket, sys; print(socket.create_connection((sys.argv[1], {port}), timeout=5).recv(64).decode())"


def test_virtual_nodes_and_cleanup(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """Each node has its own hostname, resolves the other by name to its 10.x address and reaches it
    over the bridge, not over a shared loopback; leaving the ``with`` block on an exception kills what
    still runs on the nodes (by pid) and deletes the namespaces and links. A dead session's leftovers
    are reaped by the next one."""
    reason = multinode.unavailable_reason()
    if reason:
        _skip(pytestconfig, "the virtual-nodes test", reason)
    # What a test session killed with SIGKILL leaves: a namespace and a bridge named after its pid.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {f"aed{dead.pid}x0-n1": ["ip", "netns", "add", f"aed{dead.pid}x0-n1"],
             f"aedb{dead.pid}x0": ["ip", "link", "add", f"aedb{dead.pid}x0", "type", "bridge"]}
    for argv in stale.values():
        subprocess.run(argv, check=True)
    nodes = multinode.VirtualNodes(tmp_path / "net")
    port = _free_port()
    with pytest.raises(RuntimeError, match="a test failing"), nodes:
        assert set(stale) <= set(nodes.reaped), "a dead session's namespace and bridge were not reaped"
        assert [nodes.run(n, ["hostname"]).stdout.strip() for n in nodes.names] == ["n1", "n2"]
        assert nodes.run("n2", ["getent", "ahostsv4", "n1"]).stdout.split()[0] == nodes.addr["n1"]
        server = nodes.popen("n1", [sys.executable, "-c", SERVE.format(port=port)], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        own_loopback = nodes.run("n2", [sys.executable, "-c", ASK.format(port=port), "127.0.0.1"])
        assert own_loopback.returncode != 0 and "ConnectionRefusedError" in own_loopback.stderr, own_loopback
        assert nodes.run("n2", [sys.executable, "-c", ASK.format(port=port), "n1"]).stdout.strip() == "hi from n1"
        # Left running, in a session of its own (as a daemon would be): the clean-up must find it.
        stray = nodes.popen("n2", ["sleep", "600"], start_new_session=True)
        raise RuntimeError("a test failing with processes still running on the nodes")
    assert stray.wait(15) is not None and server.wait(15) is not None
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for name in [*nodes.netns.values(), *nodes.veth.values(), nodes.bridge, *stale]:
        assert not re.search(rf"\b{name}\b", left), f"{name} left behind:\n{left}"


# ------------------------------------------------------------------------------- launch configs

# Launched by every config: each process writes what the launcher told it into its own file (their
# stdout lines interleave). With --world it also builds the Accelerator the trainer builds, which
# joins every process into one gloo world (CPU only: the GPU configs need no GPU to start their
# processes, but cannot build a NCCL world here).
RANK_PROBE = """import json, os, socket, sys
info = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK")}
info.update(pid=os.getpid(), host=socket.gethostname())
if "--world" in sys.argv:
    import torch
    from accelerate import Accelerator
    acc = Accelerator(cpu=not torch.cuda.is_available())
    info.update(index=acc.process_index, processes=acc.num_processes, backend=acc.state.backend)
with open(os.path.join(sys.argv[1], f"rank-{info['RANK'] or 0}.json"), "w") as fh:
    json.dump(info, fh)
"""


@pytest.mark.parametrize("name", sorted(p.name for p in ACCELERATE_CONFIGS.glob("*.yaml")))
def test_accelerate_config(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Each file parses (accelerate's own loader) to what its name says, and ``accelerate launch
    --config_file F`` really starts that many processes: one machine here, two machines once per
    virtual node (``--machine_rank 0/1``, ``--main_process_ip`` = n1). The CPU ones also form one
    gloo world of that size."""
    from accelerate.commands.config.config_args import load_config_from_file

    assert name in EXPECTED, f"configs/accelerate/{name} is new: add what it must launch to EXPECTED"
    cfg = load_config_from_file(str(ACCELERATE_CONFIGS / name))
    assert (str(cfg.distributed_type).split(".")[-1], cfg.num_machines, cfg.num_processes) == EXPECTED[name], cfg
    assert cfg.num_machines in (1, 2), f"{name}: only 1 or 2 machines can be launched here"
    script, out = tmp_path / "probe.py", tmp_path / "ranks"
    script.write_text(RANK_PROBE)
    out.mkdir()
    probe = [str(script), str(out), *(["--world"] if cfg.use_cpu else [])]
    launch = ["accelerate", "launch", "--config_file", str(ACCELERATE_CONFIGS / name)]
    if cfg.num_machines == 1:
        r = subprocess.run([*launch, "--main_process_port", str(_free_port()), *probe], env=_env(), capture_output=True, text=True, timeout=180)
        outputs = {"this host": r}
    else:
        net: multinode.VirtualNodes = request.getfixturevalue("net")
        procs = {node: net.popen(node, [*launch, "--machine_rank", str(rank), "--main_process_ip", net.addr["n1"], *probe],
                                 env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank, node in enumerate(net.names)}
        texts = {node: p.communicate(timeout=180)[0] for node, p in procs.items()}
        outputs = {node: subprocess.CompletedProcess(p.args, p.returncode, texts[node], "") for node, p in procs.items()}
    for where, r in outputs.items():
        assert r.returncode == 0, f"{where}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank-*.json"))]
    n = cfg.num_processes
    assert len(ranks) == n and len({r["pid"] for r in ranks}) == n, ranks
    per_machine = n // cfg.num_machines
    hosts = sorted(net.names) if cfg.num_machines > 1 else [socket.gethostname()]
    for r in ranks:
        rank = int(r["RANK"] or 0)
        assert int(r["WORLD_SIZE"] or 1) == n and r["host"] == hosts[rank // per_machine], r
        if cfg.use_cpu:
            assert (r["index"], r["processes"], r["backend"]) == (rank, n, "gloo"), r
    print(f"\n{name}: {n} process(es) on {cfg.num_machines} machine(s)", end="")


# ------------------------------------------------------------------------- two nodes, no SLURM


@pytest.mark.slow
def test_two_nodes_without_slurm(net: multinode.VirtualNodes, reference: Path, tiny_shards: Path, tmp_path: Path) -> None:
    """The README's multi-node command, once per node, rendezvous at n1's 10.x address."""
    runs, audit = tmp_path / "runs", tmp_path / "audit"
    main_ip = net.addr["n1"]
    assert main_ip.startswith("10.") and not main_ip.startswith("127.")
    env = _env(**multinode.write_audit_env(audit, runs))
    procs = {node: net.popen(node, ["accelerate", "launch", "--config_file", f"configs/accelerate/{TWO_NODE_CONFIG}",
                                    "--machine_rank", str(rank), "--main_process_ip", main_ip,
                                    "launch/train.py", "--config", "configs/debug.yaml", *_overrides(tiny_shards, runs, "nodes")],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, node in enumerate(net.names)}
    # While they train: n2's trainer is connected to n1's 10.x address (each namespace has its own
    # loopback, so nothing else could carry it; this shows it).
    seen: set[str] = set()
    while any(p.poll() is None for p in procs.values()):
        ss = net.run("n2", ["ss", "-Htnp", "state", "established"]).stdout
        seen |= {line for line in ss.splitlines() if f"{main_ip}:" in line and '"python' in line}
        time.sleep(0.5)
    outs = {node: p.communicate()[0] for node, p in procs.items()}
    for node, p in procs.items():
        assert p.returncode == 0, f"{node}: {outs[node][-4000:]}"
    assert seen, "never saw n2's trainer connected to n1's 10.x address"
    print(f"\nn2 -> n1 connections seen: {sorted({re.sub(r' +', ' ', s) for s in seen})[:3]}")
    assert "on cpu x2" in outs["n1"], outs["n1"][-3000:]

    run = runs / "nodes"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == EPOCHS * 8, summary
    diff = _max_diff(run, reference)
    print(f"2 nodes (no SLURM) vs 2 processes on one node: max |weight difference| = {diff:.3g}")
    assert diff <= 1e-6

    # Shared storage: every checkpoint holds exactly its files, and each file had exactly one writer.
    for step in _complete_steps(run):
        assert {p.name for p in (run / "checkpoints" / f"step-{step}").iterdir()} == CHECKPOINT_FILES
    assert not list((run / "checkpoints").glob(".tmp-*")), "a temporary checkpoint folder was left behind"
    for step in _complete_steps(run):
        _check_writers(audit, step)


# ------------------------------------------------------------------------------ two-node SLURM


def _wait(ok, timeout: float, what: str, cluster: slurm_cluster.TwoNodeCluster, job: str, log: Path) -> float:
    """Poll ``ok`` (releasing requeued jobs early); return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ok():
            return time.monotonic() - start
        cluster.release_requeued(job)
        time.sleep(0.3)
    text = log.read_text(errors="replace") if log.exists() else "(no job log)"
    text = "\n".join(line for line in text.splitlines() if "it/s]" not in line)[-6000:]
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job: {cluster.job(job)}\n--- job log\n{text}\n{cluster.logs()}")


def _attempts(log: Path) -> list[str]:
    """The job log cut into one piece per attempt."""
    return re.split(r"(?m)^(?==== \S+ job \d+ restart \d+ )", log.read_text(errors="replace"))[1:]


def _check_attempt(text: str, net: multinode.VirtualNodes) -> None:
    """Both nodes launched, one process each, rendezvous at n1's 10.x address from either node."""
    assert "2 node(s) x 1 process(es)" in text, text[:2000]
    for rank, node in enumerate(net.names):
        want = f"=== node {rank} of 2 ({node}): machine_rank {rank}, rendezvous at n1 = {net.addr['n1']}"
        assert want in text, (want, text[:3000])


def _trainers(net: multinode.VirtualNodes, node: str) -> list[int]:
    """The trainer processes (torchrun's workers: ``python -u launch/train.py ...``) on ``node``."""
    pids = []
    for pid in net.pids(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if argv[1:3] == [b"-u", b"launch/train.py"]:
            pids.append(pid)
    return pids


def _sbatch(cluster: slurm_cluster.TwoNodeCluster, tmp_path: Path, script: str, opts: list[str], args: list[str],
            env: dict[str, str] | None = None) -> str:
    argv = ["--nodes=2", *opts, "--output", str(tmp_path / "sbatch-%j.out"), script, "configs/debug.yaml", *args]
    return cluster.sbatch(argv, cwd=REPO, env=env)


def _ended(cluster: slurm_cluster.TwoNodeCluster, job: str) -> bool:
    return cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY")


def _check_writers(audit: Path, step: int) -> None:
    """Checkpoint ``step`` was saved by both ranks (each its own RNG state, rank 0 the rest), and no
    file of the run was ever written by two ranks."""
    writes = multinode.writes_by_rank(audit)
    shared = {p: r for p, r in writes.items() if len(r) > 1}
    assert not shared, f"files written by more than one rank: {shared}"
    for f in CHECKPOINT_FILES:  # written in .tmp-step-N/, then the folder is renamed
        writers = {r for p, rs in writes.items() if p.endswith(f"/checkpoints/.tmp-step-{step}/{f}") for r in rs}
        assert writers == ({f[-5]} if f.startswith("random_states_") else {"0"}), (step, f, writers)


@pytest.mark.slow
def test_sbatch_two_nodes_usr1_and_requeue(cluster: slurm_cluster.TwoNodeCluster, net: multinode.VirtualNodes, reference: Path,
                                          tiny_shards: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """slurm/train_cpu.sbatch on 2 nodes: USR1 to the batch shell (what --signal=B:USR1@120 does),
    then an admin's ``scontrol requeue`` (SIGTERM to the whole job); same W&B run, same weights."""
    t0 = time.monotonic()
    runs, audit = tmp_path / "runs", tmp_path / "audit"
    # 1 process per node (train_cpu.sbatch's default is 2): the 2-process reference, one per node.
    job = _sbatch(cluster, tmp_path, "slurm/train_cpu.sbatch", [], _overrides(tiny_shards, runs, "usr1", wandb="offline"),
                  env={"AEDIST_CPU_PROCS": "1", **multinode.write_audit_env(audit, runs)})
    run = runs / "usr1"
    log = run / f"slurm-{job}.out"
    request.addfinalizer(lambda: cluster.scancel(job))  # a failure must not leave the nodes busy

    stops = []
    for n, (how, signal_job) in enumerate([("USR1", lambda: cluster.scancel("--signal=USR1", "--batch", job)),
                                           ("SIGTERM", lambda: cluster.scontrol("requeue", job))], start=1):
        # Mid-run: the attempt made a checkpoint of its own and is still training.
        base = max(_complete_steps(run), default=0)
        _wait(lambda: max(_complete_steps(run), default=0) > base, 150, f"a checkpoint of attempt {n}", cluster, job, log)  # noqa: B023
        assert not (run / "summary.json").exists(), "the run finished before it could be stopped; make it longer"
        r = signal_job()
        assert r.returncode == 0, r.stderr
        # The next attempt starts once this one has ended on both nodes (and been requeued).
        _wait(lambda: log.exists() and len(_attempts(log)) > n, 120, f"the requeued attempt after {how}", cluster, job, log)  # noqa: B023
        text = _attempts(log)[n - 1]
        _check_attempt(text, net)
        saved = re.findall(r"preempted: saved step (\d+); exiting with 75", text)
        assert saved, text[-3000:]
        stops.append(int(saved[0]))
        assert {"USR1": "got USR1", "SIGTERM": "got SIGTERM"}[how] in text, text[-3000:]
        if how == "USR1":  # we requeue; after SLURM's own SIGTERM, SLURM does
            assert "requeueing job" in text, text[-3000:]
        # Both nodes' tasks ended as "stopped", not as a failure that --kill-on-bad-exit acts on.
        assert "=== node 0: trainer stopped on a signal" in text and "=== node 1: trainer stopped on a signal" in text, text[-3000:]
    _wait(lambda: cluster.job(job).get("JobState") == "COMPLETED", 200, "the job to complete", cluster, job, log)

    attempts = _attempts(log)
    assert len(attempts) == 3, [a[:200] for a in attempts]
    _check_attempt(attempts[-1], net)
    summary = json.loads((run / "summary.json").read_text())
    ref = json.loads((reference / "summary.json").read_text())
    assert summary["completed"] is True and summary["step"] == ref["step"], summary
    assert summary["resumed_from"] == stops and stops[0] < stops[1] < summary["step"], (summary["resumed_from"], stops)
    for step in stops:  # both nodes saved the step they stopped at
        _check_writers(audit, step)
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumes] == stops and all(r["world_size"] == 2 for r in resumes), resumes
    # One W&B run across the three attempts.
    ids = {m.group(1) for d in (run / "wandb").glob("offline-run-*") if (m := re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+)", d.name))}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 3 and ids == {summary["wandb_run_id"]}, (ids, summary["wandb_run_id"])
    diff = _max_diff(run, reference)
    print(f"\n2-node SLURM job stopped at steps {stops} (USR1, SIGTERM), 3 attempts in {time.monotonic() - t0:.0f} s; "
          f"vs 2 processes on one node: max |weight difference| = {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.slow
def test_sbatch_two_nodes_kill9(cluster: slurm_cluster.TwoNodeCluster, net: multinode.VirtualNodes, reference: Path,
                                tiny_shards: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """slurm/train.sbatch with its GPU request switched off: kill -9 of n2's trainer ends the job on
    both nodes within 60 s (no hang); ``scontrol requeue`` resumes from the last complete checkpoint."""
    runs = tmp_path / "runs"
    # train.sbatch asks for 1 GPU and 8 CPUs per node; the command line overrides both, and no GPUs
    # alone (no AEDIST_CPU_PROCS) means 1 gloo process per node.
    job = _sbatch(cluster, tmp_path, "slurm/train.sbatch", ["--gpus-per-node=0", "--cpus-per-task=2"], _overrides(tiny_shards, runs, "kill9"))
    run = runs / "kill9"
    log = run / f"slurm-{job}.out"
    request.addfinalizer(lambda: cluster.scancel(job))
    _wait(lambda: bool(_complete_steps(run)), 150, "the first checkpoint", cluster, job, log)
    assert not (run / "summary.json").exists(), "the run finished before the kill; make it longer"

    (victim,) = _trainers(net, "n2")
    assert _trainers(net, "n1"), "no trainer on n1"
    os.kill(victim, 9)
    took = _wait(lambda: _ended(cluster, job) and not _trainers(net, "n1"), 60, "n1's trainer and the job to end after kill -9",
                 cluster, job, log)
    state = cluster.job(job)
    assert state.get("JobState") == "FAILED" and state.get("Restarts") == "0", state  # a crash is not requeued by itself
    text = log.read_text(errors="replace")
    _check_attempt(text, net)
    assert "trainer failed" in text and "not requeued" in text, text[-3000:]
    last = max(_complete_steps(run))
    print(f"\nkill -9 of n2's trainer: job ended {took:.1f} s later; newest complete checkpoint: step {last}")

    r = cluster.scontrol("requeue", job)
    assert r.returncode == 0, r.stderr
    _wait(lambda: cluster.job(job).get("JobState") == "COMPLETED", 200, "the requeued job to complete", cluster, job, log)
    _check_attempt(_attempts(log)[-1], net)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] is True and summary["step"] == EPOCHS * 8 and summary["resumed_from"] == [last], summary
    diff = _max_diff(run, reference)
    print(f"2-node SLURM job killed (-9) and requeued vs 2 processes on one node: max |weight difference| = {diff:.3g}")
    assert diff <= 1e-6
