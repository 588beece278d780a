"""Shards read from a URL through the local cache, against real HTTP servers on loopback (and fsspec's
memory:// filesystem): same batches as the local folder, one download per shard per node, a bounded
cache, retries of a broken transfer, one-line errors naming the URL when the server is gone."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from aedist.data import remote
from aedist.data import shards as S
from aedist.data.loader import load_batches
from aedist.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """Same retry logic and count, shorter waits between attempts."""
    monkeypatch.setattr(remote, "BACKOFF_S", 0.05)


class Handler(http.server.SimpleHTTPRequestHandler):
    """The standard library's file server, counting GETs, with Range support and injectable failures."""

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.gets[self.path.rsplit("/", 1)[-1]] += 1
            srv.ranges.append(self.headers.get("Range"))
            fail = self.path.endswith(".tar") and srv.failures > 0
            if fail:
                srv.failures -= 1
        path = Path(self.translate_path(self.path))
        flip = srv.flip and self.path.endswith(".tar")
        if not (fail or flip or self.headers.get("Range")) or not path.is_file():
            return super().do_GET()
        data = bytearray(path.read_bytes())
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        if flip:
            data[len(data) // 2] ^= 0xFF
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if fail:  # die mid-body: half of what was promised, then the connection (and maybe the server) goes
            self.wfile.write(data[start : start + (len(data) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            if srv.die_for_good:
                threading.Thread(target=srv.shutdown).start()
                srv.socket.close()
            return
        self.wfile.write(data[start:])


@pytest.fixture
def serve():
    servers = []

    def start(folder: Path, failures: int = 0, die_for_good: bool = False, flip: bool = False) -> tuple[str, http.server.ThreadingHTTPServer]:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder.parent)))
        srv.gets, srv.ranges, srv.lock = Counter(), [], threading.Lock()
        srv.failures, srv.die_for_good, srv.flip = failures, die_for_good, flip
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/{folder.name}", srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def read(src: str | Path, split: str = "train", **kw) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*load_batches(src, split, 16, shuffle=False, drop_last=False, **kw))
    return np.concatenate(xs), np.concatenate(ys)


_CHILD = """
import sys, numpy as np
from aedist.data.loader import load_batches
n = sum(len(y) for _, y in load_batches(sys.argv[1], "train", 16))
print(n)
"""


def child(url: str, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, url], cwd=ROOT, env={**os.environ, "AEDIST_CACHE_DIR": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_url_reads_like_the_folder_then_from_disk(local, serve, tmp_path):
    url, srv = serve(local)
    remote.set_cache_defaults(tmp_path / "cache", 1.0)
    try:
        m = S.read_manifest(url)
        assert m.url == url and m.root.parent == tmp_path / "cache"
        for split in ("train", "test"):
            gx, gy = read(url, split)
            lx, ly = read(local, split)
            np.testing.assert_array_equal(gx, lx)
            np.testing.assert_array_equal(gy, ly)
        first = dict(srv.gets)
        assert first == {"manifest.json": 1, **{s.name: 1 for sp in m.splits.values() for s in sp.shards}}
        assert sum(len(y) for _, y in load_batches(url, "train", 16, epoch=1)) == 192  # a second epoch: from disk
        assert dict(srv.gets) == first
        for p in (m.root / s.name for s in m.split("train").shards):  # complete, verified, no leftovers
            assert S.file_sha256(p) == S.file_sha256(local / p.name)
        assert not list(m.root.glob(".*.part-*"))
    finally:
        remote.set_cache_defaults(None, None)
    # a second process on the node: only the (tiny) manifest comes over the network
    proc = child(url, tmp_path / "cache")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.split() == ["192"], err
    assert srv.gets["manifest.json"] == 2 and all(v == 1 for k, v in srv.gets.items() if k.endswith(".tar"))
    # and with the server gone, the cached manifest and shards still serve (with a warning)
    srv.shutdown()
    srv.server_close()
    proc = child(url, tmp_path / "cache")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.split() == ["192"] and "cached manifest" in err, err


def test_two_processes_download_each_shard_once(local, serve, tmp_path):
    url, srv = serve(local)
    procs = [child(url, tmp_path / "cache") for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and out.split() == ["192"], err
    assert {k: v for k, v in srv.gets.items() if k.endswith(".tar") and k.startswith("train")} == {f"train-{i:06d}.tar": 1 for i in range(8)}


def test_transfer_broken_mid_download_is_resumed(local, serve, tmp_path):
    url, srv = serve(local, failures=2)
    m = S.read_manifest(url, cache_dir=tmp_path / "c")
    path = S.fetch_shard(m, m.split("train").shards[0])
    assert S.file_sha256(path) == m.split("train").shards[0].sha256
    assert srv.gets["train-000000.tar"] == 3 and sum(r is not None for r in srv.ranges) == 2  # the retries asked for the rest
    assert not list(path.parent.glob(".*.part-*"))


def test_server_that_dies_mid_download_gives_one_line_error_naming_the_url(local, serve, tmp_path, capsys):
    url, srv = serve(local, failures=1, die_for_good=True)
    m = S.read_manifest(url, cache_dir=tmp_path / "c")

    def main(argv: list[str]) -> int:  # what training does: read batches from the URL
        for _ in load_batches(url, "train", 16, shuffle=False):
            pass
        return 0

    with pytest.raises(SystemExit) as stop:
        run_cli(main, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: could not download {url}/train-000000.tar after {remote.ATTEMPTS} attempts"), err
    assert not list(m.root.glob("*.tar")) and not list(m.root.glob(".*.part-*"))  # nothing half-written is left


def test_corrupt_bytes_are_refused_and_a_corrupt_cache_copy_is_replaced(local, serve, tmp_path):
    url, srv = serve(local, flip=True)
    m = S.read_manifest(url, cache_dir=tmp_path / "c")
    with pytest.raises(UserError, match="sha256") as err:
        S.fetch_shard(m, m.split("train").shards[1])
    assert url in str(err.value) and srv.gets["train-000001.tar"] == remote.ATTEMPTS
    srv.flip = False
    shard = m.split("train").shards[1]
    path = S.fetch_shard(m, shard)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))  # damaged on disk; this process trusted it once, a new one must not
    remote._CHECKED.clear()
    assert S.file_sha256(S.fetch_shard(m, shard)) == shard.sha256 and srv.gets["train-000001.tar"] == remote.ATTEMPTS + 2


def test_cache_is_bounded_least_recently_read_go_first(local, serve, tmp_path):
    url, _ = serve(local)
    shard_bytes = (local / "train-000000.tar").stat().st_size
    bound_gb = 3.5 * shard_bytes / 2**30  # room for 3 shards
    m = S.read_manifest(url, cache_dir=tmp_path / "c", cache_max_gb=bound_gb)
    order = m.split("train").shards
    for s in order:
        S.fetch_shard(m, s)
        S.release_shard(m, s)  # read and done with: evictable (a pinned shard never is: test_remote_security.py)
    cached = sorted(p.name for p in m.root.glob("*.tar"))
    assert cached == [s.name for s in order[-3:]]
    assert sum(p.stat().st_size for p in m.root.glob("*.tar")) <= bound_gb * 2**30
    for s in (order[-3], order[0]):  # order[-3] read again: now the most recent
        S.fetch_shard(m, s)
        S.release_shard(m, s)
    assert sorted(p.name for p in m.root.glob("*.tar")) == sorted([order[-3].name, order[-1].name, order[0].name])


def test_missing_url_and_dead_server_are_one_line_errors(local, serve, tmp_path):
    url, srv = serve(local)
    with pytest.raises(UserError, match="HTTP 404") as err:
        S.read_manifest(url + "-nope", cache_dir=tmp_path / "c")
    assert url + "-nope/manifest.json" in str(err.value) and srv.gets["manifest.json"] == 1  # 404: not retried
    port = srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    with pytest.raises(UserError, match=f"127.0.0.1:{port}/s/manifest.json after {remote.ATTEMPTS} attempts"):
        S.read_manifest(f"http://127.0.0.1:{port}/s", cache_dir=tmp_path / "other")


def test_fsspec_url_scheme(local, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in local.iterdir():
        fs.pipe(f"/bucket/s/{p.name}", p.read_bytes())
    try:
        remote.set_cache_defaults(tmp_path / "c", 1.0)
        gx, gy = read("memory://bucket/s")
        lx, ly = read(local)
        np.testing.assert_array_equal(gx, lx)
        np.testing.assert_array_equal(gy, ly)
        with pytest.raises(UserError, match="not found"):
            S.read_manifest("memory://bucket/nothing-here")
    finally:
        remote.set_cache_defaults(None, None)
        fs.rm("/bucket", recursive=True)


def test_is_url_and_cache_folders():
    assert remote.is_url("https://h/x") and remote.is_url("s3://b/k") and not remote.is_url("shards/x")
    assert not remote.is_url("file:///tmp/x") and not remote.is_url(Path("http://h/x"))
    a, b = remote.cache_folder("http://h/a/s", Path("/c")), remote.cache_folder("http://h/b/s", Path("/c"))
    assert a != b and a.parent == Path("/c") and remote.cache_folder("http://h/a/s/", Path("/c")) == a


def test_a_cache_named_once_is_used_by_later_calls_that_name_none(local, serve, tmp_path):
    url, _ = serve(local)
    m = S.read_manifest(url, cache_dir=tmp_path / "mine", cache_max_gb=1.0)  # what the engine does with data.cache_dir
    gx, _ = read(url, "test")  # load_batches names no cache
    assert m.root.parent == tmp_path / "mine" and (m.root / "test-000000.tar").is_file() and len(gx) == 10
