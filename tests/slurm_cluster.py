"""A real one-node SLURM cluster in a temporary folder, for tests (needs root and Debian's packages).

    with SlurmCluster(tmp_path / "slurm") as cluster:
        job = cluster.sbatch(["slurm/train_cpu.sbatch", "cfg.yaml"], cwd=repo)
        cluster.wait_state(job, {"COMPLETED"})

It starts its own ``munged`` (own key, socket, pid and log files), ``slurmctld`` and ``slurmd``, all in
the foreground as child processes, on free ports, so it neither needs nor disturbs a system-wide
munge or SLURM. Client commands find the cluster through ``SLURM_CONF`` in :attr:`SlurmCluster.env`;
sbatch exports the environment to the job, so ``scontrol requeue`` inside a batch script reaches the
same controller. :meth:`stop` ends exactly the processes it started, by their pids.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")


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
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"

    # ------------------------------------------------------------------ set-up

    def _write_files(self) -> None:
        r = self.root
        for d in ("munge", "ctld", "spool", "log"):
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
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r / "ctld"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
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
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        self.conf.write_text(conf.lstrip())

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        out = open(self.root / "log" / log, "ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
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
        self._spawn([_which("slurmd"), "-D", "-f", str(self.conf)], "slurmd.out")
        self._wait(lambda: self.node_state().startswith("idle"), timeout, "node idle")
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

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients

    def _run(self, argv: list[str], check: bool = False, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check, **kw)

    def node_state(self) -> str:
        return self._run(["sinfo", "-h", "-N", "-o", "%t"]).stdout.strip()

    def sbatch(self, argv: list[str], cwd: Path | str | None = None) -> str:
        """Submit with ``sbatch --parsable``; return the job id."""
        r = self._run(["sbatch", "--parsable", *argv], check=False, cwd=cwd)
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
