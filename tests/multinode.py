"""Two "machines" on one host, for multi-node tests: network namespaces on a private bridge.

    with VirtualNodes(tmp_path / "net") as net:           # nodes n1, n2 at 10.77.X.1, 10.77.X.2
        net.run("n2", ["hostname"]).stdout                 # -> "n2"
        proc = net.popen("n1", ["accelerate", "launch", ...])

Each node is a network namespace (``ip netns``) joined to a bridge in the root namespace by a veth
pair; the root namespace holds the bridge's own address (``.254``, the "controller", where a SLURM
controller can listen). Commands run on a node inside that namespace plus a fresh UTS namespace
(its own hostname, ``hostname n1``) and mount namespace, where a hosts file naming every node is
bind-mounted over ``/etc/hosts`` so ``n1`` resolves to its 10.x address on every node, as cluster
DNS would. A node's loopback is its own, so processes of two nodes can reach each other only over
the bridge: a rendezvous that succeeds across two nodes went over the 10.x network.

Everything is torn down by :meth:`stop` (also at interpreter exit): processes still running in a
node's namespace are killed by pid (``ip netns pids``), then the links and namespaces are deleted.
Names carry the creating pid, and the subnet is the first 10.77.X.0/24 not in use, so concurrent
test sessions do not collide; :meth:`start` first removes what a session that died without cleaning
up (SIGKILL) left behind: namespaces and links named after a pid that no longer exists.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (None when they can): tried, not guessed."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "unshare", "mount"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
            return f"{tool} is missing (apt-get install -y iproute2 util-linux mount)"
    probe = f"aed{os.getpid()}-probe"  # reap_stale() removes it should we die before `ip netns del`
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    try:
        r = subprocess.run(["nsenter", f"--net=/run/netns/{probe}", "unshare", "--uts", "--mount", "--", "true"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"`unshare --uts --mount` inside a network namespace failed: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


_instances = itertools.count()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reap_stale() -> list[str]:
    """Delete the namespaces (killing what runs in them) and links of :class:`VirtualNodes` whose
    creating process is gone; return their names. Only names this module makes are touched:
    ``aed<pid>x<k>-<node>`` namespaces, ``aedb<pid>x<k>`` bridges and ``aed<pid>x<k><node>`` veths."""
    gone: list[str] = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(r"aed(\d+)(x\d)?-\w+", name)
        if m and not _alive(int(m.group(1))):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", name, check=False)
            gone.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+: (aedb?(\d+)x\d\w*)[@:]", line)
        if m and not _alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)
            gone.append(m.group(1))
    return gone


def _free_subnet() -> str:
    used = _ip("-o", "-4", "addr", "show").stdout
    for x in range(1, 255):
        if f" 10.77.{x}." not in used:
            return f"10.77.{x}"
    raise RuntimeError("no free 10.77.X.0/24 subnet")


class VirtualNodes:
    """Nodes ``names`` (default n1, n2) on a bridge; see the module docstring."""

    def __init__(self, root: Path, names: tuple[str, ...] = ("n1", "n2"), controller: str = "ctl") -> None:
        self.root = Path(root)
        self.names = names
        self.controller = controller
        # pid (at most 7 digits, pid_max <= 2**22) and which of this process's instances it is
        tag = f"{os.getpid()}x{next(_instances) % 10}"
        self.bridge = f"aedb{tag}"  # interface names: at most 15 characters
        self.netns = {n: f"aed{tag}-{n}" for n in names}
        self.veth = {n: f"aed{tag}{n}" for n in names}
        if max(len(v) for v in (self.bridge, *self.veth.values())) > 15:
            raise ValueError(f"node names {names} too long for Linux interface names (15 characters)")
        self.subnet = ""
        self.addr: dict[str, str] = {}
        self.controller_addr = ""
        self.hosts = self.root / "hosts"
        self._started = False
        self.reaped: list[str] = []

    def start(self) -> VirtualNodes:
        self.root.mkdir(parents=True, exist_ok=True)
        self.reaped = reap_stale()  # what dead sessions left behind
        atexit.register(self.stop)
        self._started = True
        self.subnet = _free_subnet()
        self.controller_addr = f"{self.subnet}.254"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, n in enumerate(self.names, start=1):
            ns, host_end, node_end = self.netns[n], self.veth[n], f"eth-{n}"
            self.addr[n] = f"{self.subnet}.{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", node_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("addr", "add", f"{self.addr[n]}/24", "dev", node_end, ns=ns)
            _ip("link", "set", node_end, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        lines = ["127.0.0.1 localhost", f"{self.controller_addr} {self.controller}"]
        lines += [f"{self.addr[n]} {n}" for n in self.names]
        self.hosts.write_text("\n".join(lines) + "\n")
        return self

    def argv(self, node: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``node``: its network namespace, hostname and /etc/hosts. Every layer
        execs the next, so a Popen's pid is the command's own pid."""
        setup = 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"'
        # nsenter rather than `ip netns exec`, which mounts a fresh /sys that hides /sys/fs/cgroup
        # (slurmd refuses to start without it).
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts", "--mount", "--",
                "sh", "-c", setup, node, str(self.hosts), *argv]

    def popen(self, node: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(node, argv), **kw)

    def run(self, node: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(node, argv), **kw)

    def pids(self, node: str) -> list[int]:
        """Processes in ``node``'s network namespace."""
        r = _ip("netns", "pids", self.netns[node], check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, to every process left in the nodes' namespaces (ours: only this
        object's nodes live there)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for n in self.names for p in self.pids(n)]
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + timeout
            while pids and time.monotonic() < end:
                pids = [p for n in self.names for p in self.pids(n)]
                time.sleep(0.2)
            if not pids:
                return

    def stop(self) -> None:
        """Kill what still runs on the nodes, delete the links and namespaces (idempotent)."""
        if not self._started:
            return
        self._started = False
        self.kill_all()
        for n in self.names:
            _ip("link", "del", self.veth[n], check=False)  # deletes both ends of the pair
            _ip("netns", "del", self.netns[n], check=False)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> VirtualNodes:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- who writes which file

WRITE_AUDIT = '''"""Test instrumentation (tests/multinode.py): log every file this process writes under
$AEDIST_AUDIT_ROOT to $AEDIST_AUDIT_DIR/writes-PID.log as "RANK<TAB>HOW<TAB>PATH" lines.

Python-level writes come from an audit hook (open for writing, rename, mkdir, remove, rmtree);
torch.save and safetensors' save_file write from C++/Rust, which no audit hook sees, so they are
wrapped (the real function still does the work) right after their modules load."""
import importlib.util
import os
import sys

_ROOT = os.path.abspath(os.environ["AEDIST_AUDIT_ROOT"]) + os.sep
_LOG = os.path.join(os.environ["AEDIST_AUDIT_DIR"], f"writes-{os.getpid()}.log")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _note(how, path):
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:  # a file descriptor, a buffer, None
        return
    if path.startswith(_ROOT):
        with open(_LOG, "a") as fh:  # outside _ROOT: not noted again
            fh.write(f"{os.environ.get('RANK', '?')}\\t{how}\\t{path}\\n")


def _hook(event, args):
    if event == "open" and args[2] is not None and args[2] & _WRITE:
        _note("open", args[0])
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
        _note(event, args[0])


def _wrap(fn, how):
    def wrapper(*a, **kw):  # torch.save(obj, f, ...), save_file(tensors, filename, ...)
        _note(how, a[1] if len(a) > 1 else kw.get("f", kw.get("filename")))
        return fn(*a, **kw)
    return wrapper


class _AfterLoad:
    """Patch torch.save / safetensors.torch.save_file as soon as their modules are executed."""
    PATCH = {"torch": "save", "safetensors.torch": "save_file"}

    def find_spec(self, name, path=None, target=None):
        if name not in self.PATCH:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            attr = self.PATCH[name]
            setattr(module, attr, _wrap(getattr(module, attr), f"{name}.{attr}"))
        spec.loader.exec_module = exec_module
        return spec


sys.addaudithook(_hook)
sys.meta_path.insert(0, _AfterLoad())
'''


def write_audit_env(folder: Path, root: Path) -> dict[str, str]:
    """Environment that makes Python processes log their writes under ``root`` into ``folder``
    (a ``sitecustomize`` on PYTHONPATH); read the result with :func:`writes_by_rank`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(WRITE_AUDIT)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "AEDIST_AUDIT_DIR": str(folder), "AEDIST_AUDIT_ROOT": str(root)}


def writes_by_rank(folder: Path) -> dict[str, set[str]]:
    """``{path: {ranks that wrote it}}`` from the logs of :func:`write_audit_env`. Creating a folder
    is left out: every rank may ``makedirs(exist_ok=True)`` the folder it writes its own file into."""
    out: dict[str, set[str]] = {}
    for log in folder.glob("writes-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            rank, how, path = line.split("\t", 2)
            if how != "os.mkdir":
                out.setdefault(path, set()).add(rank)
    return out
