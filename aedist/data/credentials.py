"""Credentials for shard URLs, never stored or shown.

``https://user:password@host/…`` (percent-encode ``@ : /`` in them), else the host's entry in ``$NETRC``
or ``~/.netrc``, is sent as HTTP basic auth, only to URLs under the one given (a redirect elsewhere does
not get it); else ``$AEDIST_HTTP_TOKEN`` as a bearer token. Whatever shows or keeps a URL uses
:func:`mask_url` (``https://user:***@host/…``) or :func:`shown`, and :func:`scrub` removes any known
secret from text a library produced.
"""

from __future__ import annotations

import http.client
import logging
import netrc
import os
import re
import threading
import urllib.parse
import urllib.request

log = logging.getLogger("aedist.data.remote")

TOKEN_ENV = "AEDIST_HTTP_TOKEN"
TIMEOUT_S = 60.0  # per socket operation: a server that stops sending is an error after this long


def is_url(src: object) -> bool:
    """True for ``scheme://…`` strings other than ``file://`` (a Path never is one: it folds ``//``)."""
    return isinstance(src, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", src) is not None and not src.startswith("file://")


_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/?#]*)@")  # scheme, userinfo (up to the authority's last '@')
_CREDENTIALS: dict[str, tuple[str, str]] = {}  # URL without credentials -> (user, password), from the URL or netrc
_SHOWN: dict[str, str] = {}  # URL without credentials -> how to show it (user:***@ when the URL named a user)
_SECRETS: set[str] = set()  # every password and token seen: scrubbed from any text that could echo one
_STATE_LOCK = threading.Lock()


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user:password@, user, password)``; user and password are percent-decoded, None when absent."""
    m = _USERINFO.match(url) if is_url(url) else None
    if m is None:
        return url, None, None
    user, sep, password = m.group(2).partition(":")
    clean = m.group(1) + url[m.end():]
    return clean, urllib.parse.unquote(user), urllib.parse.unquote(password) if sep else None


def strip_credentials(url: str) -> str:
    """``url`` without its ``user:password@``: what names the cache folder, so all credentials share one cache."""
    return split_credentials(url)[0]


def mask_url(url: str) -> str:
    """``url`` safe to print or store: ``https://user:secret@host/p`` -> ``https://user:***@host/p``.

    A user without a password (often a token itself) becomes ``***``; anything else is returned as is.
    Config files, W&B configs and summaries use this for ``data.shards``.
    """
    m = _USERINFO.match(url) if is_url(url) else None
    if m is None:
        return url
    user, sep, _ = m.group(2).partition(":")
    return f"{m.group(1)}{user + ':***' if sep else '***'}@{url[m.end():]}"


def register_url(url: str) -> str:
    """Remember ``url``'s credentials (from the URL, else netrc) for requests under it; returns it without them.

    Registering the bare URL again (a later read of ``m.url``) keeps what an earlier call registered; so
    does a masked one (``user:***@``, from a run's config.yaml), which otherwise takes netrc's.
    """
    clean, user, password = split_credentials(url.rstrip("/"))
    parts = urllib.parse.urlsplit(clean)
    shown_as = mask_url(url.rstrip("/")) if user is not None else None
    if password == "***" or (password is None and user == "***"):  # mask_url's output carries no secret to use
        user = password = None
    if user is None and parts.scheme.lower() in ("http", "https") and parts.hostname:
        found = _netrc_login(parts.hostname)
        if found:
            user, password = found
    if user is None:
        return clean
    with _STATE_LOCK:
        _CREDENTIALS[clean] = (user, password or "")
        for secret in (password, urllib.parse.quote(password or "", safe=""), user if password is None else None):
            if secret:
                _SECRETS.add(secret)
        if shown_as is not None:
            _SHOWN[clean] = shown_as
    return clean


def shown(url: str) -> str:
    """``url`` (without credentials) as messages show it: with ``user:***@`` if it was given with a user."""
    url = mask_url(url)
    with _STATE_LOCK:
        base = _base(url, _SHOWN)
        return url if base is None else _SHOWN[base] + url[len(base):]


def scrub(text: str) -> str:
    """``text`` with every known password and token replaced by ``***`` (for messages of other libraries)."""
    token = os.environ.get(TOKEN_ENV)
    for secret in sorted({*_SECRETS, *([token] if token else [])}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _base(url: str, table: dict[str, object]) -> str | None:
    """The longest key of ``table`` that ``url`` equals or lies under."""
    hits = [b for b in table if url == b or url.startswith(b + "/")]
    return max(hits, key=len) if hits else None


def _netrc_login(host: str) -> tuple[str, str] | None:
    """(login, password) for ``host`` from ``$NETRC`` or ``~/.netrc``; None without one (a broken file: a warning)."""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return None
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (netrc.NetrcParseError, OSError) as err:  # its message may quote a token: name only the file and line
        log.warning("ignoring %s: it does not parse (line %s)", path, getattr(err, "lineno", "?"))
        return None
    if auth is None or not auth[2]:
        return None
    return auth[0] or "", auth[2]


def _with_credentials(url: str) -> str:
    """``url`` with its registered ``user:password@`` put back (fsspec reads credentials from the URL)."""
    with _STATE_LOCK:
        base = _base(url, _CREDENTIALS)
        if base is None:
            return url
        user, password = _CREDENTIALS[base]
    scheme, rest = url.split("://", 1)
    q = urllib.parse.quote
    return f"{scheme}://{q(user, safe='')}{':' + q(password, safe='') if password else ''}@{rest}"


def _open(req: urllib.request.Request) -> http.client.HTTPResponse:
    """Open ``req`` with the credentials registered for its URL: basic auth, sent up front and answered on 401
    only for URLs under the registered one (urllib's handler); else the bearer token, never sent on a redirect."""
    with _STATE_LOCK:
        base = _base(req.full_url, _CREDENTIALS)
        cred = _CREDENTIALS.get(base) if base else None
    handlers = []
    if cred is not None:
        mgr = urllib.request.HTTPPasswordMgrWithPriorAuth()
        mgr.add_password(None, base, cred[0], cred[1], is_authenticated=True)
        handlers.append(urllib.request.HTTPBasicAuthHandler(mgr))
    elif token := os.environ.get(TOKEN_ENV):
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    return urllib.request.build_opener(*handlers).open(req, timeout=TIMEOUT_S)
