"""Real SLURM clusters in a temporary folder, for tests (need root and Debian's packages).

    with SlurmCluster(tmp_path / "slurm") as cluster:                 # one node: this host
        job = cluster.sbatch(["slurm/train_cpu.sbatch", "cfg.yaml"], cwd=repo)

    with VirtualNodes(tmp_path / "net") as net, TwoNodeCluster(tmp_path / "slurm", net) as cluster:
        job = cluster.sbatch(["--nodes=2", "slurm/train_cpu.sbatch", "cfg.yaml"], cwd=repo)

Each starts its own ``munged`` (own key, socket, pid and log files), ``slurmctld`` and ``slurmd``(s), all
in the foreground as child processes, on free ports, so it neither needs nor disturbs a system-wide
munge or SLURM. Client commands find the cluster through ``SLURM_CONF`` in :attr:`SlurmCluster.env`;
sbatch exports the environment to the job, so ``scontrol requeue`` inside a batch script reaches the
same controller. :meth:`stop` ends exactly the processes it started, by their pids.

:class:`TwoNodeCluster` runs one ``slurmd`` per node of a :class:`multinode.VirtualNodes` (nodes
``n1``, ``n2``: own network namespace, hostname and spool/pid/log files); ``slurmctld`` and ``munged``
stay in the root namespace, the controller listening on the nodes' bridge (munge's socket is a
file, which every namespace sees). Jobs run inside their node's namespaces, so an ``srun`` step that
spans both nodes talks over the 10.x bridge network.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multinode import VirtualNodes

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "squeue", "srun")


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    if os.geteuid() != 0:
        return "a one-node SLURM cluster needs root (slurmd runs jobs as their user)"
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        return f"SLURM/munge binaries missing: {', '.join(missing)} (apt-get install -y slurmctld slurmd slurm-client munge)"
    return None


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which is not on every PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One controller + one compute node (this host, 2 CPUs) + munged, all under ``root``."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]  # what `hostname -s` prints; slurmd finds itself by it
        self.conf = self.root / "slurm.conf"
        self.ctld_addr = "127.0.0.1"
        self.procs: list[subprocess.Popen] = []
        self._held: dict[str, float] = {}  # requeued job -> since when it is held back on idle nodes
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"

    # ------------------------------------------------------------------ set-up

    def _write_files(self) -> None:
        r = self.root
        for d in ("munge", "ctld", "log", *(f"spool/{n}" for n in self.nodes())):
            (r / d).mkdir(parents=True, exist_ok=True)
        # munged refuses keys and folders that others can read or write.
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            subprocess.run([_which("mungekey"), "-c", "-k", str(key)], check=True)
        os.chmod(key, 0o600)
        self.munge_socket = r / "munge" / "munge.socket"
        conf = f"""
ClusterName=aedisttest
SlurmctldHost={self.host}({self.ctld_addr})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r / "ctld"}
SlurmdSpoolDir={r / "spool" / "%n"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd-%n.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd-%n.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
MessageTimeout=10
"""
        nodes = self.nodes()
        conf += "".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus} State=UNKNOWN\n" for n, a in nodes.items())
        conf += f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO\n"
        self.conf.write_text(conf.lstrip())

    def nodes(self) -> dict[str, str]:
        """Node name -> address: this host on loopback."""
        return {self.host: "127.0.0.1"}

    def _start_slurmds(self) -> None:
        self._spawn([_which("slurmd"), "-D", "-f", str(self.conf)], "slurmd.out")

    def _spawn(self, argv: list[str], log: str, popen=subprocess.Popen) -> subprocess.Popen:
        out = open(self.root / "log" / log, "ab")
        proc = popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        self._write_files()
        atexit.register(self.stop)  # also when the test session ends without reaching teardown
        m = self.root / "munge"
        self._spawn([_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                     f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"], "munged.out")
        self._wait(lambda: self.munge_socket.exists(), 15, "munged socket")
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") > 0, timeout, "slurmctld")
        self._start_slurmds()
        self._wait(lambda: self.all_idle(), timeout, "nodes idle")
        return self

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}\n{self.logs()}")
            if ok():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}\n{self.logs()}")

    def stop(self) -> None:
        """Stop the daemons this object started (by pid, slurmd first, munged last)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients

    def _run(self, argv: list[str], check: bool = False, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(argv, capture_output=True, text=True, check=check, **kw)

    def node_state(self) -> str:
        """The state of the (first) node, e.g. ``idle``."""
        return self._run(["sinfo", "-h", "-N", "-o", "%t"]).stdout.strip().split("\n")[0]

    def node_states(self) -> dict[str, str]:
        """Every node's state: ``{"n1": "idle", "n2": "alloc"}``."""
        lines = self._run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split("\n")
        return dict(line.split() for line in lines if len(line.split()) == 2)

    def all_idle(self) -> bool:
        states = self.node_states()
        return set(states) == set(self.nodes()) and all(s == "idle" for s in states.values())

    def release_requeued(self, job_id: str, settle: float = 2.0) -> None:
        """Start a requeued job now, not after SLURM's hold-back (BeginTime ~2 min ahead), once every
        node has cleaned up the previous attempt and stayed idle for ``settle`` seconds: slurmd refuses
        a launch whose credential is from the second in which it revoked the old attempt's ("Job N
        already killed, do not launch batch job"). Call it while polling."""
        state = self.job(job_id)
        if state.get("JobState") != "PENDING" or state.get("Reason") != "BeginTime" or not self.all_idle():
            self._held.pop(job_id, None)
            return
        idle_since = self._held.setdefault(job_id, time.monotonic())
        if time.monotonic() - idle_since >= settle:
            self.scontrol("update", f"JobId={job_id}", "StartTime=now")
            self._held.pop(job_id, None)

    def sbatch(self, argv: list[str], cwd: Path | str | None = None, env: dict[str, str] | None = None) -> str:
        """Submit with ``sbatch --parsable`` (``env``: extra variables, exported to the job); return the job id."""
        r = self._run(["sbatch", "--parsable", *argv], check=False, cwd=cwd, **({"env": {**self.env, **env}} if env else {}))
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once the controller forgot it)."""
        r = self._run(["scontrol", "show", "job", "-o", job_id])
        out: dict[str, str] = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out.setdefault(k, v)
        return out

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self._run(["scontrol", *args])

    def scancel(self, *args: str) -> subprocess.CompletedProcess:
        return self._run(["scancel", *args])

    def logs(self) -> str:
        """Tails of the daemons' logs (for failure messages)."""
        parts = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.exists():
                parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)


class TwoNodeCluster(SlurmCluster):
    """``slurmctld`` + ``munged`` here, one ``slurmd`` on each node of ``net`` (see the module docstring)."""

    def __init__(self, root: Path, net: VirtualNodes, cpus: int | None = None) -> None:
        super().__init__(root, cpus)
        self.net = net
        self.ctld_addr = net.controller_addr

    def nodes(self) -> dict[str, str]:
        return dict(self.net.addr)

    def _start_slurmds(self) -> None:
        for node in self.net.names:
            # -N: the node name this slurmd serves (also what its hostname says).
            argv = [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)]
            self._spawn(argv, f"slurmd-{node}.out", popen=functools.partial(self.net.popen, node))

    def stop(self) -> None:
        """Cancel what still runs, stop the daemons, then kill anything left on the nodes (job steps
        outlive their slurmd)."""
        if any(p.poll() is None for p in self.procs):
            jobs = self._run(["squeue", "-h", "-o", "%i"]).stdout.split()
            if jobs:
                self._run(["scancel", *jobs])
                end = time.monotonic() + 20
                while time.monotonic() < end and self._run(["squeue", "-h", "-o", "%i"]).stdout.split():
                    time.sleep(0.5)
        super().stop()
        self.net.kill_all()
