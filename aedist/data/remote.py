"""Shards read from a URL through a local, size-bounded cache: ``data.shards=https://host/shards/fashion4``.

    set_cache_defaults("~/.cache/aedist/shards", max_gb=50)   # once per process (data.cache_dir, data.cache_max_gb)
    m = read_manifest("https://host/shards/fashion4")            # aedist.data.shards; m.root = the cache folder
    path = fetch_shard(m, m.split("train").shards[0])            # downloaded on first use, pinned in the cache
    ...                                                          # read it
    release_shard(m, m.split("train").shards[0])                 # now it may be evicted

http(s):// is fetched with the standard library (urllib: no extra dependency, Range requests resume a
broken transfer); any other scheme (``s3://``, ``gs://``, ``memory://`` …) goes through fsspec when it
and the scheme's extra (s3fs, gcsfs …) are installed. A URL's files land in
``CACHE_DIR/<host-and-path>-<hash>/``: the manifest is fetched once per process (the cached copy is
used, with a warning, when the server cannot be reached), a shard once per cache: it is downloaded to
``.NAME.part-PID``, checked against the manifest's size and sha256, then renamed into place, under a
per-shard lock so that the ranks of a node download it once. A transfer that breaks is retried
(``ATTEMPTS`` times with exponential backoff); then a one-line :class:`UserError` names the URL.

Ownership: the cache creates each URL folder with an ``.aedist-cache`` marker inside (the folder appears
already holding it), and eviction only ever looks inside marked folders, so a ``data.cache_dir`` that
also holds local shards folders never loses them. Every name a manifest gives is a plain file name
(:func:`check_name`), so nothing is written outside the folder.

Eviction: when the cache outgrows ``max_gb``, the least recently read shards are deleted (read = atime,
which :func:`touch` sets explicitly, since filesystems mounted ``noatime`` do not), except the pinned
ones: a reader holds a shared ``flock`` on ``.NAME.pin`` from :func:`fetch` until :func:`unpin`, and
the evictor deletes a shard only while holding an exclusive non-blocking lock on it. The kernel drops a
dead process's locks, so a crashed reader never pins anything.

Credentials: ``https://user:password@host/…`` (percent-encode ``@ : /`` in them), else the host's
entry in ``$NETRC`` or ``~/.netrc``, is sent as HTTP basic auth (only to URLs under the one given:
a redirect elsewhere does not get it); else ``$AEDIST_HTTP_TOKEN`` as a bearer token. Credentials are
never stored or shown: the cache folder is named after the URL without them (so any credentials share
one cache), and logs and errors show :func:`mask_url`'s ``https://user:***@host/…``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from aedist.data.credentials import (  # noqa: F401 - is_url, mask_url, split_credentials, TOKEN_ENV: this module's public names too
    TIMEOUT_S,
    TOKEN_ENV,
    _open,
    _with_credentials,
    is_url,
    mask_url,
    register_url,
    scrub,
    shown,
    split_credentials,
    strip_credentials,
)
from aedist.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/aedist/shards"
DEFAULT_CACHE_MAX_GB = 50.0
ATTEMPTS = 4
BACKOFF_S = 0.5  # waits 0.5, 1, 2 s between the attempts
CHUNK = 1 << 20
OWNER = ".aedist-cache"
"""Marker file in every folder the cache created; eviction touches no other folder."""
_DEFAULTS: dict[str, str | float | None] = {"cache_dir": None, "max_gb": None}
_NO_RETRY = (400, 401, 403, 404, 405, 410)
_AUTH_HINT = f"check the credentials (user:password@ in the URL, ~/.netrc or $NETRC, or ${TOKEN_ENV})"
_RESERVED = ("manifest.json",)  # the cache's own files; the others (locks, pins, parts, the marker) start with '.'


# ----------------------------------------------------------------------------- cache folders, names, pins


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
    """``cache_dir/<host_path>-<12 hex of sha256(url)>`` of the URL without credentials: readable, distinct for
    distinct URLs, the same whoever reads it."""
    url = strip_credentials(url).rstrip("/")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1])[-80:].strip("_.")
    return cache_dir / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


_UNOWNED: set[Path] = set()


def claim_folder(folder: Path, url: str) -> bool:
    """Make ``folder`` (with its :data:`OWNER` marker) unless it exists; True if it is the cache's to evict from.

    The folder is built under a temporary name and renamed into place, so no process ever sees it
    without its marker. A folder that exists without one (made by an older aedist, or not a cache at
    all) is read and written but never evicted from.
    """
    if (folder / OWNER).is_file():
        return True
    if not folder.exists():
        tmp = folder.with_name(f".{folder.name}.new-{os.getpid()}-{threading.get_ident()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / OWNER).write_text(json.dumps({"url": strip_credentials(url), "by": "aedist.data.remote"}) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    if (folder / OWNER).is_file():
        return True
    if folder not in _UNOWNED:
        _UNOWNED.add(folder)
        log.warning("cache folder %s was not made by this cache (no %s marker): its shards are never evicted; "
                    "delete the folder to let the cache manage it", folder, OWNER)
    return False


def check_name(name: object, where: str) -> str:
    """``name`` if it is a plain file name inside its folder, else a UserError naming ``where`` it came from.

    A manifest's names become paths (``folder / name``) that are downloaded to and renamed into: a
    ``../x``, an absolute path or a ``sub/x`` would write outside the folder, a leading dot could
    replace the cache's own locks and marker.
    """
    ok = (isinstance(name, str) and name and not name.startswith(".") and not any(c in name for c in "/\\\0")
          and name not in _RESERVED)
    if not ok:
        shown_name = repr(name[:200] + '…' if isinstance(name, str) and len(name) > 200 else name)  # repr: one line, whatever it holds
        raise UserError(f"{where} names the shard {shown_name}, which is not a plain file name (no '/', '\\', NUL, leading '.', "
                        "empty or manifest.json); refusing to read it: fix the manifest or re-pack with launch/pack.py")
    return name  # type: ignore[return-value]


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


_PINS: dict[str, tuple[int, int]] = {}  # abspath of a shard -> (fd with LOCK_SH on its pin file, holders in this process)
_PINS_LOCK = threading.Lock()  # also held by the evictor while it holds LOCK_EX, so pin() never waits on this process


def _pin_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.pin")


def pin(path: Path) -> None:
    """Keep ``path`` from eviction until :func:`unpin` (or this process ends): a shared flock on ``.NAME.pin``.

    Counted: each pin needs its unpin. One descriptor per shard per process (POSIX-lock NFS clients drop
    a process's lock when any of its descriptors of the file closes, so there is never a second).
    """
    key = os.path.abspath(path)
    with _PINS_LOCK:
        if key in _PINS:
            fd, n = _PINS[key]
            _PINS[key] = (fd, n + 1)
            return
        fd = os.open(_pin_file(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for an evictor that is deleting the shard right now
        except BaseException:
            os.close(fd)
            raise
        _PINS[key] = (fd, 1)


def unpin(path: Path) -> None:
    """Undo one :func:`pin`; the last one releases the lock (by closing: a forked child's copy keeps the parent's)."""
    key = os.path.abspath(path)
    with _PINS_LOCK:
        if key not in _PINS:
            return
        fd, n = _PINS.pop(key)
        if n > 1:
            _PINS[key] = (fd, n - 1)
        else:
            os.close(fd)


def _evict_one(path: Path) -> bool:
    """Delete ``path`` unless a reader anywhere on the node pins it; True if it is gone."""
    with _PINS_LOCK:
        if os.path.abspath(path) in _PINS:
            return False
        try:
            fd = os.open(_pin_file(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # pinned by another process
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                return False
            return True
        finally:
            os.close(fd)  # the pin file stays: deleting it would let a waiting reader lock an orphaned inode


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
        resp = _open(req)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send, or a stale part: start over
            tmp.unlink()
            raise ConnectionError("HTTP 416 for a partial download; restarting") from None
        if err.code in (401, 403):
            raise _Fatal(f"HTTP {err.code} {err.reason}; {_AUTH_HINT}") from None
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

        opened = fsspec.open(_with_credentials(url), "rb")
    except ImportError as err:  # the scheme's extra is missing (s3fs, gcsfs …)
        raise _Fatal(f"reading {url.split('://')[0]}:// URLs needs an extra package ({scrub(str(err))}); e.g. pip install s3fs") from None
    except ValueError as err:  # unknown protocol
        raise _Fatal(scrub(str(err))) from None
    try:
        with opened as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    except FileNotFoundError as err:
        raise _Fatal(f"not found ({scrub(str(err))})") from None


def download(url: str, dest: Path, size: int | None = None, sha256: str | None = None) -> Path:
    """Fetch ``url`` to ``dest`` atomically (``.NAME.part-PID`` then rename), checking ``size``/``sha256``.

    Retries a broken or corrupt transfer ``ATTEMPTS`` times; then raises a one-line UserError naming the URL
    (masked: credentials in ``url`` are used, never shown).
    """
    if split_credentials(url)[1] is not None:
        url = register_url(url)
    where = shown(url)
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
                raise UserError(f"could not download {where}: {scrub(str(err))}") from None
            except (OSError, http.client.HTTPException, urllib.error.URLError) as err:  # resets, refusals, timeouts, 5xx
                last = scrub(f"{type(err).__name__}: {err}")
                log.warning("download of %s failed (attempt %d/%d): %s", where, attempt + 1, ATTEMPTS, last)
                continue
            got = tmp.stat().st_size
            if size and got != size:
                last = f"got {got} bytes, the manifest says {size}"
            elif sha256 and file_sha256(tmp) != sha256:
                last = "sha256 differs from the manifest's"
            else:
                os.replace(tmp, dest)
                return dest
            log.warning("download of %s is corrupt (attempt %d/%d): %s", where, attempt + 1, ATTEMPTS, last)
            tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {where} after {ATTEMPTS} attempts (last: {last}); check the URL and the server")
    finally:
        tmp.unlink(missing_ok=True)


def fetch_manifest(url: str, folder: Path, name: str = "manifest.json") -> bytes:
    """The manifest's bytes, fetched fresh; the cached copy (with a warning) when the server cannot be reached.

    Creates ``folder`` as the cache's own (:func:`claim_folder`) if it does not exist yet.
    """
    if split_credentials(url)[1] is not None:
        url = register_url(url)
    claim_folder(folder, url)
    cached = folder / name
    try:
        download(join(url, name), cached)
    except UserError as err:
        if not cached.is_file():
            raise UserError(f"no shards at {shown(url)}: {err}") from None
        log.warning("using the cached manifest %s: %s", cached, err)
    return cached.read_bytes()


_CHECKED: dict[tuple[str, int, int], bool] = {}


def fetch(url: str, folder: Path, name: str, size: int, sha256: str, max_gb: float) -> Path:
    """``folder/name``, downloaded from ``url/name`` unless a copy with the manifest's size and sha256 is there.

    A cached copy is hashed once per process (as local shards are); a corrupt one is downloaded again.
    The returned shard is pinned (:func:`pin`): it is not evicted, by any process of the node, until
    this process calls :func:`unpin` for it (or ends).
    """
    path = folder / check_name(name, f"the manifest of {shown(url)}")
    claim_folder(folder, url)
    pin(path)  # before looking: an evictor that got there first finishes deleting, then we download it again
    try:
        ok = _fetch_pinned(url, folder, name, size, sha256)
    except BaseException:
        unpin(path)
        raise
    if not ok:
        evict(folder.parent, int(max_gb * 2**30), keep=path)
    return path


def _fetch_pinned(url: str, folder: Path, name: str, size: int, sha256: str) -> bool:
    """The body of :func:`fetch`: True if the cached copy was good, False if it was downloaded."""
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
    return bool(ok)


_OVER: set[Path] = set()


def evict(cache_dir: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently read shards (``*.tar``) of the URL folders under ``cache_dir`` until it fits.

    Only folders the cache made (:func:`claim_folder`'s marker) are looked into, and only regular
    files; a shard pinned by a reader (:func:`pin`, any process on the node) or ``keep`` stays.
    """
    files = []
    with contextlib.suppress(OSError):
        for folder in cache_dir.iterdir():
            if folder.is_symlink() or not (folder / OWNER).is_file():
                continue
            for p in folder.glob("*.tar"):
                with contextlib.suppress(OSError):
                    st = p.lstat()
                    if stat.S_ISREG(st.st_mode):
                        files.append((st.st_atime_ns, st.st_size, p))
    total = sum(f[1] for f in files)
    gone = []
    for _, nbytes, p in sorted(files):
        if total <= max_bytes:
            break
        if keep is not None and p == keep:
            continue
        if _evict_one(p):
            total -= nbytes
            gone.append(p)
    if total > max_bytes and cache_dir not in _OVER:  # once per process: it recurs on every download while it lasts
        _OVER.add(cache_dir)
        log.warning("shard cache %s holds %.2f GB, above its bound of %.2f GB: the shards that readers on this node "
                    "are using are not evicted (or one shard is larger than the bound)", cache_dir, total / 2**30, max_bytes / 2**30)
    return gone
