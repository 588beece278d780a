"""The URL cache against hostile manifests, shared cache folders and secrets, on real loopback HTTP servers:
a manifest cannot name a file outside its folder, eviction deletes only what the cache fetched and
nothing a reader on the node still uses, and credentials in a URL are used but never shown or stored."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from aedist.data import remote
from aedist.data import shards as S
from aedist.data.loader import load_batches
from aedist.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "pa55-Wq8zK3vT"  # distinctive: any appearance in output or on disk is this secret leaking


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Quick retries, and no credentials from the machine (a real ~/.netrc or token) into these tests."""
    monkeypatch.setattr(remote, "BACKOFF_S", 0.02)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv(remote.TOKEN_ENV, raising=False)


class _Counted(http.server.BaseHTTPRequestHandler):
    """Quiet, and counts every GET per path in ``server.gets`` (under ``server.lock``)."""

    def log_message(self, *args: object) -> None:
        pass

    def count(self) -> http.server.HTTPServer:
        srv = self.server
        with srv.lock:
            srv.gets[self.path] += 1
        return srv


class Files(_Counted, http.server.SimpleHTTPRequestHandler):
    """The standard library's file server; counts GETs; with ``server.auth`` set, answers 401 to any other
    Authorization header (as a real protected server does: a challenge, then the credentials)."""

    def do_GET(self) -> None:
        srv = self.count()
        if srv.auth and self.headers.get("Authorization") not in srv.auth:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="shards"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


class Hostile(_Counted):
    """An attacker's server: ``manifest.json`` is the crafted one, every other path is the payload."""

    def do_GET(self) -> None:
        srv = self.count()
        body = srv.manifest if self.path.endswith("/manifest.json") else srv.payload
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[Callable[..., http.server.ThreadingHTTPServer]]:
    started = []

    def start(handler: type, **attrs: object) -> http.server.ThreadingHTTPServer:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.gets, srv.lock, srv.auth = Counter(), threading.Lock(), None
        for k, v in attrs.items():
            setattr(srv, k, v)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def files_server(server: Callable[..., http.server.ThreadingHTTPServer], folder: Path, **attrs: object) -> tuple[str, http.server.ThreadingHTTPServer]:
    srv = server(functools.partial(Files, directory=str(folder.parent)), **attrs)
    return f"http://127.0.0.1:{srv.server_address[1]}/{folder.name}", srv


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def url_with(url: str, userinfo: str) -> str:
    return url.replace("http://", f"http://{userinfo}@", 1)


def fetch_all(m: S.Manifest, split: str = "train") -> None:
    """Read every shard of ``split`` through the cache as a reader does: fetch, (read), release."""
    for s in m.split(split).shards:
        S.fetch_shard(m, s)
        S.release_shard(m, s)


# ----------------------------------------------------------------------------- 1. manifest names


def crafted_manifest(local: Path, name: str, payload: bytes) -> bytes:
    """``local``'s manifest with its first train shard renamed to ``name`` and described as ``payload``,
    so that size and sha256 check out: only the name can stop the write."""
    d = json.loads((local / S.MANIFEST).read_text())
    d["splits"]["train"]["shards"][0].update(name=name, bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    return json.dumps(d).encode()


@pytest.mark.parametrize("kind", ["parent", "absolute", "subfolder"])
def test_remote_manifest_naming_a_path_outside_the_folder_is_refused_before_any_write(local, server, tmp_path, kind):
    cache = tmp_path / "cache"
    victim = {"parent": cache / "evil.tar", "absolute": tmp_path / "home" / "precious.tar", "subfolder": None}[kind]
    if victim is not None:
        victim.parent.mkdir(parents=True)
        victim.write_bytes(b"the user's own file")
    payload = b"attacker bytes " * 100
    srv = server(Hostile, payload=payload)
    url = f"http://127.0.0.1:{srv.server_address[1]}/s"
    name = {"parent": "../evil.tar", "absolute": str(victim), "subfolder": "sub/x.tar"}[kind]
    srv.manifest = crafted_manifest(local, name, payload)

    with pytest.raises(UserError) as err:
        m = S.read_manifest(url, cache_dir=cache)
        fetch_all(m)  # what training would do next
    if victim is not None:
        assert victim.read_bytes() == b"the user's own file"
    assert not (remote.cache_folder(url, cache) / "sub").exists()
    assert [p for p in cache.rglob("*.tar") if p != victim] == []
    assert [p for p in srv.gets if not p.endswith("/manifest.json")] == []  # not a byte of the payload was asked for
    msg = str(err.value)
    assert "\n" not in msg and repr(name) in msg and "plain file name" in msg and f"{url}/manifest.json" in msg, msg


@pytest.mark.parametrize("name", ["../evil.tar", "/tmp/aedist-evil.tar", "sub/x.tar", "a\\b.tar", "", ".hidden.tar", "x\x00.tar", "manifest.json", 7])
def test_local_manifest_with_a_name_that_is_not_a_plain_file_name_is_refused(local, tmp_path, name):
    folder = tmp_path / "s"
    folder.mkdir()
    for p in local.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    d = json.loads((folder / S.MANIFEST).read_text())
    d["splits"]["train"]["shards"][0]["name"] = name
    (folder / S.MANIFEST).write_text(json.dumps(d))
    with pytest.raises(UserError, match="not a plain file name") as err:
        S.read_manifest(folder)
    assert str(folder / S.MANIFEST) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="not a plain file name"):  # and so every consumer: the loader too
        next(iter(load_batches(folder, "train", 16)))


# ----------------------------------------------------------------------------- 2. what eviction may delete


def test_eviction_never_deletes_shards_the_cache_did_not_fetch(local, server, tmp_path):
    cache = tmp_path / "cache"
    pack = cache / "mypack"  # a local shards folder that happens to sit in data.cache_dir
    S.write_shards(pack, {"train": (np.zeros((40, 1, 4, 4), np.uint8), np.arange(40))}, ["a"], samples_per_block=4, blocks_per_shard=1)
    stray = cache / "127.0.0.1_1_s-0123456789ab"  # shaped like a cache folder, but not made by the cache
    stray.mkdir()
    (stray / "x.tar").write_bytes(b"kept")
    before = {p: S.file_sha256(p) for p in [*pack.glob("*.tar"), stray / "x.tar"]}
    assert len(before) == 11
    url, _ = files_server(server, local)
    shard_bytes = (local / "train-000000.tar").stat().st_size
    m = S.read_manifest(url, cache_dir=cache, cache_max_gb=1.5 * shard_bytes / 2**30)  # room for one shard
    fetch_all(m)
    assert {p: S.file_sha256(p) for p in before if p.is_file()} == before
    assert len(list(m.root.glob("*.tar"))) == 1  # eviction did run, in the cache's own folder
    assert (m.root / remote.OWNER).is_file() and not (pack / remote.OWNER).exists()


_HOLDER = """
import sys
from aedist.data import shards as S
m = S.read_manifest(sys.argv[1])
shard = m.split("train").shards[0]
S.fetch_shard(m, shard)
print("held", flush=True)
sys.stdin.readline()
S.release_shard(m, shard)
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("end", ["release", "crash"])
def test_a_shard_another_process_is_reading_is_not_evicted_until_it_is_done(local, server, tmp_path, end):
    url, _ = files_server(server, local)
    cache = tmp_path / "cache"
    shard_bytes = (local / "train-000000.tar").stat().st_size
    bound = int(1.5 * shard_bytes)
    env = {**os.environ, "AEDIST_CACHE_DIR": str(cache), "AEDIST_CACHE_MAX_GB": str(bound / 2**30)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        m = S.read_manifest(url, cache_dir=cache, cache_max_gb=bound / 2**30)
        held = m.root / m.split("train").shards[0].name
        fetch_all(m)  # 7 downloads, each followed by an eviction; the held shard is the least recently read
        assert held.is_file() and S.file_sha256(held) == m.split("train").shards[0].sha256
        assert sorted(p.name for p in m.root.glob("*.tar")) == [held.name, m.split("train").shards[-1].name]
        assert remote.evict(cache, 0) == [m.root / m.split("train").shards[-1].name] and held.is_file()  # asked directly: still refused
        if end == "release":
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "released"
        else:  # a reader killed mid-read leaves no pin behind: the kernel drops its lock
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=60)
        assert remote.evict(cache, 0) == [held] and not held.exists()
    finally:
        if holder.poll() is None:
            holder.communicate("\n\n", timeout=60)


def test_skip_mode_with_a_tight_bound_reads_every_shard_and_lets_them_go_after(local, server, tmp_path):
    """on_error=skip fetches every shard before reading any: with room for two, they must all stay until read."""
    url, _ = files_server(server, local)
    cache = tmp_path / "cache"
    shard_bytes = (local / "train-000000.tar").stat().st_size
    bound = int(2.5 * shard_bytes)
    S.read_manifest(url, cache_dir=cache, cache_max_gb=bound / 2**30)
    stats: dict[str, int] = {}
    ys = np.concatenate([y for _, y in load_batches(url, "train", 16, shuffle=False, drop_last=False, on_error="skip", stats=stats)])
    assert stats["skipped_shards"] == 0 and sorted(ys.tolist()) == list(range(192))
    remote.evict(cache, bound)  # the stream is done: nothing is pinned any more
    assert sum(p.stat().st_size for p in cache.rglob("*.tar")) <= bound


# ----------------------------------------------------------------------------- 9. credentials


def no_secret_anywhere(texts: list[str], cache: Path, secret: str = PASSWORD) -> None:
    for text in texts:
        assert secret not in text, text
    for dirpath, dirnames, filenames in os.walk(cache):
        for n in dirnames + filenames:
            assert secret not in n, os.path.join(dirpath, n)
        for n in filenames:
            assert secret.encode() not in Path(dirpath, n).read_bytes(), os.path.join(dirpath, n)


def test_basic_auth_from_the_url_is_used_and_never_shown_or_stored(local, server, tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    url, srv = files_server(server, local, auth={basic("alice", PASSWORD), basic("bob", "other-pw")})
    cache = tmp_path / "cache"
    secret_url = url_with(url, f"alice:{PASSWORD}")
    remote.set_cache_defaults(cache, 1.0)
    try:
        ys = np.concatenate([y for _, y in load_batches(secret_url, "train", 16, shuffle=False, drop_last=False)])
        assert sorted(ys.tolist()) == list(range(192))
        m = S.read_manifest(secret_url)
    finally:
        remote.set_cache_defaults(None, None)
    assert m.url == url and PASSWORD not in repr(m)
    assert m.root == remote.cache_folder(url, cache) == remote.cache_folder(url_with(url, "bob:other-pw"), cache)  # one cache
    assert remote.mask_url(secret_url) == url_with(url, "alice:***")
    out, err = capfd.readouterr()
    no_secret_anywhere([out, err, caplog.text], cache)


@pytest.mark.parametrize("case", ["wrong password", "404", "server gone"])
def test_errors_and_logs_show_the_url_with_the_password_masked(local, server, tmp_path, capfd, caplog, case):
    caplog.set_level(logging.DEBUG)
    url, srv = files_server(server, local, auth={basic("alice", PASSWORD)})
    userinfo = f"alice:{PASSWORD}"
    if case == "wrong password":
        userinfo, expect = f"alice:{PASSWORD}x", "HTTP 401"
    elif case == "404":
        url, expect = url + "-nope", "HTTP 404"
    else:
        srv.shutdown()
        srv.server_close()
        expect = f"after {remote.ATTEMPTS} attempts"
    secret_url = url_with(url, userinfo)

    def main(argv: list[str]) -> int:  # what train.py does with data.shards=<that URL>
        S.read_manifest(secret_url, cache_dir=tmp_path / "cache")
        return 0

    with pytest.raises(SystemExit) as stop:
        run_cli(main, [])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and expect in lines[0], err
    assert f"{url_with(url, 'alice:***')}/manifest.json" in lines[0], lines[0]
    if case == "wrong password":
        assert "credentials" in lines[0]  # and says where they come from
    no_secret_anywhere([out, err, caplog.text], tmp_path / "cache")


def test_netrc_and_token_credentials(local, server, tmp_path, monkeypatch, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    url, srv = files_server(server, local, auth={basic("carol", PASSWORD)})
    rc = tmp_path / "netrc"
    rc.write_text(f"machine 127.0.0.1 login carol password {PASSWORD}\n")
    rc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(rc))
    m = S.read_manifest(url, cache_dir=tmp_path / "cache")
    fetch_all(m, "test")
    assert (m.root / "test-000000.tar").is_file()
    # the masked URL a run's config.yaml holds (evaluating the run later) reads with netrc's credentials
    masked = S.read_manifest(url_with(url, "carol:***") + "/", cache_dir=tmp_path / "cache-2")
    fetch_all(masked, "test")
    assert masked.url == url and (masked.root / "test-000000.tar").is_file()

    token = "tok-" + PASSWORD[::-1]
    url2, _ = files_server(server, local, auth={f"Bearer {token}"})
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv(remote.TOKEN_ENV, token)
    m2 = S.read_manifest(url2, cache_dir=tmp_path / "cache")
    fetch_all(m2, "test")
    monkeypatch.setenv(remote.TOKEN_ENV, token + "-stale")
    with pytest.raises(UserError, match="HTTP 401") as err:
        S.read_manifest(url2 + "/", cache_dir=tmp_path / "other")  # another cache: fetched again, refused
    out, cerr = capfd.readouterr()
    no_secret_anywhere([out, cerr, caplog.text, str(err.value)], tmp_path / "cache")
    no_secret_anywhere([str(err.value)], tmp_path / "cache", token)


def test_mask_url():
    assert remote.mask_url("https://u:p%40ss@h:8/a/b") == "https://u:***@h:8/a/b"
    assert remote.mask_url("https://u:p@ss@h/a") == "https://u:***@h/a"  # an unencoded '@' in the password
    assert remote.mask_url("https://ghp_token@h/a") == "https://***@h/a"  # a user alone is often a token
    assert remote.mask_url("https://h/a@b") == "https://h/a@b" and remote.mask_url("shards/x@y") == "shards/x@y"
    assert remote.split_credentials("https://u:p%40ss@h/a") == ("https://h/a", "u", "p@ss")


def test_saved_config_and_tracker_config_hold_the_url_masked_and_resume_sees_no_change(tmp_path):
    import yaml

    from aedist.config import config_from_dict, save_config
    from aedist.resume import config_changes
    from aedist.tracking import _flat

    secret_url = f"https://alice:{PASSWORD}@data.example/shards/s"
    cfg = config_from_dict({"data": {"shards": secret_url}})
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert PASSWORD not in text and "https://alice:***@data.example/shards/s" in text
    assert PASSWORD not in json.dumps(_flat(cfg.to_dict()))  # what W&B gets
    assert config_changes(yaml.safe_load(text), cfg.to_dict()) == {}  # a resume with the same URL changes nothing
    assert cfg.data.shards == secret_url  # the run itself still reads with the credentials
