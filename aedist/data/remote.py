"""Shards read from a URL through a local, size-bounded cache: ``data.shards=https://host/shards/fashion4``.

    set_cache_defaults("~/.cache/aedist/shards", max_gb=50)   # once per process (data.cache_dir, data.cache_max_gb)
    m = read_manifest("https://host/shards/fashion4")            # aedist.data.shards; m.root = the cache folder
    path = fetch_shard(m, m.split("train").shards[0])            # downloaded on first use, then read from disk

http(s):// is fetched with the standard library (urllib: no extra dependency, Range requests resume a
broken transfer); any other scheme (``s3://``, ``gs://``, ``memory://`` …) goes through fsspec when it
and the scheme's extra (s3fs, gcsfs …) are installed. A URL's files land in
``CACHE_DIR/<host-and-path>-<hash>/``: the manifest is fetched once per process (the cached copy is
used, with a warning, when the server cannot be reached), a shard once per cache: it is downloaded to
``.NAME.part-PID``, checked against the manifest's size and sha256, then renamed into place, under a
per-shard lock so that the ranks of a node download it once. A transfer that breaks is retried
(``ATTEMPTS`` times with exponential backoff); then a one-line :class:`UserError` names the URL. When
the cache outgrows ``max_gb``, the least recently read shards are deleted (read = atime, which
:func:`touch` sets explicitly, since filesystems mounted ``noatime`` do not).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from aedist.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/aedist/shards"
DEFAULT_CACHE_MAX_GB = 50.0
ATTEMPTS = 4
BACKOFF_S = 0.5  # waits 0.5, 1, 2 s between the attempts
TIMEOUT_S = 60.0  # per socket operation: a server that stops sending is an error after this long
CHUNK = 1 << 20
_DEFAULTS: dict[str, str | float | None] = {"cache_dir": None, "max_gb": None}
_NO_RETRY = (400, 401, 403, 404, 405, 410)


def is_url(src: str | Path) -> bool:
    """True for ``scheme://…`` strings other than ``file://`` (a Path never is one: it folds ``//``)."""
    return isinstance(src, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", src) is not None and not src.startswith("file://")


def set_cache_defaults(cache_dir: str | Path | None = None, max_gb: float | None = None) -> None:
    """Cache folder and size bound used where a caller passes none (the engine sets data.cache_dir/_max_gb)."""
    _DEFAULTS.update(cache_dir=None if cache_dir is None else str(cache_dir), max_gb=max_gb)


def resolve_cache(cache_dir: str | Path | None, max_gb: float | None) -> tuple[Path, float]:
    """Argument, else :func:`set_cache_defaults`, else $AEDIST_CACHE_DIR / $AEDIST_CACHE_MAX_GB, else the defaults."""
    d = cache_dir or _DEFAULTS["cache_dir"] or os.environ.get("AEDIST_CACHE_DIR") or DEFAULT_CACHE_DIR
    gb = max_gb if max_gb is not None else _DEFAULTS["max_gb"]
    if gb is None:
        gb = float(os.environ.get("AEDIST_CACHE_MAX_GB", DEFAULT_CACHE_MAX_GB))
    return Path(os.path.expanduser(str(d))), float(gb)


def cache_folder(url: str, cache_dir: Path) -> Path:
    """``cache_dir/<host_path>-<12 hex of sha256(url)>``: readable, and distinct for distinct URLs."""
    url = url.rstrip("/")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1])[-80:].strip("_.")
    return cache_dir / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def touch(path: Path) -> None:
    """Mark ``path`` as just read (atime only: mtime keys the sha256 and index caches of shards.py)."""
    with contextlib.suppress(OSError):
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (flock; NFS clients map it to POSIX locks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class _Fatal(Exception):
    """A failure that retrying cannot fix (404, unknown scheme, missing fsspec extra)."""


def _http_once(url: str, tmp: Path) -> None:
    """GET ``url`` into ``tmp``, continuing a partial ``tmp`` with a Range request when the server allows it."""
    have = tmp.stat().st_size if tmp.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-", "User-Agent": "aedist"} if have else {"User-Agent": "aedist"})
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send, or a stale part: start over
            tmp.unlink()
            raise ConnectionError("HTTP 416 for a partial download; restarting") from None
        if err.code in _NO_RETRY:
            raise _Fatal(f"HTTP {err.code} {err.reason}") from None
        raise
    with resp:
        if have and resp.status != 206:  # the server ignored Range: take the whole body
            have = 0
        expected = resp.headers.get("Content-Length")
        got = 0
        with open(tmp, "ab" if have else "wb") as fh:
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                got += len(chunk)
        if expected is not None and got != int(expected):
            raise http.client.IncompleteRead(b"", int(expected) - got)


def _fsspec_once(url: str, tmp: Path) -> None:
    try:
        import fsspec

        opened = fsspec.open(url, "rb")
    except ImportError as err:  # the scheme's extra is missing (s3fs, gcsfs …)
        raise _Fatal(f"reading {url.split('://')[0]}:// URLs needs an extra package ({err}); e.g. pip install s3fs") from None
    except ValueError as err:  # unknown protocol
        raise _Fatal(str(err)) from None
    try:
        with opened as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    except FileNotFoundError as err:
        raise _Fatal(f"not found ({err})") from None


def download(url: str, dest: Path, size: int | None = None, sha256: str | None = None) -> Path:
    """Fetch ``url`` to ``dest`` atomically (``.NAME.part-PID`` then rename), checking ``size``/``sha256``.

    Retries a broken or corrupt transfer ``ATTEMPTS`` times; then raises a one-line UserError naming the URL.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    once = _http_once if url.startswith(("http://", "https://")) else _fsspec_once
    last = ""
    try:
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                once(url, tmp)
            except _Fatal as err:
                raise UserError(f"could not download {url}: {err}") from None
            except (OSError, http.client.HTTPException, urllib.error.URLError) as err:  # resets, refusals, timeouts, 5xx
                last = f"{type(err).__name__}: {err}"
                log.warning("download of %s failed (attempt %d/%d): %s", url, attempt + 1, ATTEMPTS, last)
                continue
            got = tmp.stat().st_size
            if size and got != size:
                last = f"got {got} bytes, the manifest says {size}"
            elif sha256 and file_sha256(tmp) != sha256:
                last = "sha256 differs from the manifest's"
            else:
                os.replace(tmp, dest)
                return dest
            log.warning("download of %s is corrupt (attempt %d/%d): %s", url, attempt + 1, ATTEMPTS, last)
            tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url} after {ATTEMPTS} attempts (last: {last}); check the URL and the server")
    finally:
        tmp.unlink(missing_ok=True)


def fetch_manifest(url: str, folder: Path, name: str = "manifest.json") -> bytes:
    """The manifest's bytes, fetched fresh; the cached copy (with a warning) when the server cannot be reached."""
    cached = folder / name
    try:
        download(join(url, name), cached)
    except UserError as err:
        if not cached.is_file():
            raise UserError(f"no shards at {url}: {err}") from None
        log.warning("using the cached manifest %s: %s", cached, err)
    return cached.read_bytes()


_CHECKED: dict[tuple[str, int, int], bool] = {}


def fetch(url: str, folder: Path, name: str, size: int, sha256: str, max_gb: float) -> Path:
    """``folder/name``, downloaded from ``url/name`` unless a copy with the manifest's size and sha256 is there.

    A cached copy is hashed once per process (as local shards are); a corrupt one is downloaded again.
    """
    path = folder / name
    with file_lock(folder / f".{name}.lock"):
        st = path.stat() if path.is_file() else None
        key = (str(path), st.st_size, st.st_mtime_ns) if st else None
        ok = st is not None and st.st_size == size and (_CHECKED.get(key) or not sha256 or file_sha256(path) == sha256)
        if not ok:
            if st is not None:
                log.warning("cached shard %s differs from the manifest; downloading it again", path)
            for stale in folder.glob(f".{name}.part-*"):  # left by a killed process (we hold the lock: nobody else writes them)
                stale.unlink(missing_ok=True)
            download(join(url, name), path, size, sha256)
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
        _CHECKED[key] = True
    touch(path)
    if not ok:
        evict(folder.parent, int(max_gb * 2**30), keep=path)
    return path


def evict(cache_dir: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently read shards (``*.tar``) of every URL under ``cache_dir`` until it fits."""
    files = []
    for p in cache_dir.glob("*/*.tar"):
        with contextlib.suppress(OSError):
            st = p.stat()
            files.append((st.st_atime_ns, st.st_size, p))
    total = sum(f[1] for f in files)
    gone = []
    for _, nbytes, p in sorted(files):
        if total <= max_bytes:
            break
        if keep is not None and p == keep:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            total -= nbytes
            gone.append(p)
    if total > max_bytes:
        log.warning("shard cache %s holds %.2f GB, above its bound of %.2f GB (one shard is larger than the bound)",
                    cache_dir, total / 2**30, max_bytes / 2**30)
    return gone
