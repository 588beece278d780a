"""User-facing errors: one line, exit code 2, no traceback.

Library code raises :class:`UserError` for mistakes a user can fix (a typo in a config key, a missing
shards folder, a truncated shard, a checkpoint from another model). Entry scripts wrap ``main`` in
:func:`run_cli`, which turns the error into ``error: <message>`` on stderr and exit code 2.

Under ``accelerate launch`` (torch's elastic agent) every rank meets the same config mistake, so a line
is printed once per node whichever ranks raise it (:func:`say_once`), each rank leaves with its code
(:func:`leave`), and the line is handed to the agent as the failure's message: its failure table then
shows ``exitcode : 2`` with the line instead of a pointer to its docs. The launcher itself still exits 1
and prints its own traceback after the workers' lines; no worker can change that (README: Exit codes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

USER_ERROR_EXIT = 2
COLLECTIVE_TIMEOUT_EXIT = 124  # like coreutils' timeout: a rank did not arrive within train.collective_timeout_s
PEER_LOST_EXIT = 1  # another rank ended first; that rank's own line and code say why


class UserError(Exception):
    """A mistake the user can fix; its message names the problem and the fix on one line."""


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; exit with its return code, or 2 with a one-line message on UserError."""
    try:
        code = main(list(sys.argv[1:] if argv is None else argv))
    except UserError as err:
        msg = " ".join(str(err).split())  # always one line, however the message was built
        say_once(f"error: {msg}")
        leave(USER_ERROR_EXIT)
    sys.exit(code or 0)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def say_once(line: str, *, to_agent: bool = True) -> None:
    """Print ``line`` on stderr. In a multi-process job, identical lines from several ranks of a node are
    printed once: the first rank to create a marker named after the line in the launcher's per-attempt
    folder prints it (O_EXCL makes that atomic; a line only one rank has is still printed by it). With
    ``to_agent``, the line also becomes this rank's message in torch's elastic failure table."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE", "") if _world_size() > 1 else ""
    first = True
    if error_file:
        digest = hashlib.sha1(line.encode()).hexdigest()[:16]
        marker = Path(error_file).parent.parent / f".aedist-said-{digest}"  # .../attempt_N/LOCAL_RANK/error.json
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            first = False
        except OSError:  # no writable attempt folder: better twice than never
            pass
        if to_agent:
            _tell_agent(error_file, line)
    if first:
        print(line, file=sys.stderr, flush=True)


def _tell_agent(error_file: str, line: str) -> None:
    """Write the elastic agent's reply file in the format its ``@record`` decorator uses; the agent shows
    ``py_callstack`` as the failure's traceback, so the one line stands there instead."""
    stamp = str(int(time.time()))
    try:
        Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": stamp}}}))
    except OSError:
        pass  # the line is on stderr already; the table falls back to its generic text


def leave(code: int) -> NoReturn:
    """Exit with ``code``. A rank of a multi-process job leaves at once after flushing: torch's exit-time
    destructors (gloo's threads, the process group) sometimes abort such a rank ("terminate called
    without an active exception", SIGABRT), which would replace the code the agent reports."""
    if _world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection (closed|reset) by peer|broken pipe", re.IGNORECASE)


def collective_failure(err: BaseException, timeout_s: float) -> tuple[str, int] | None:
    """The one line and exit code for a collective (all-reduce, barrier, DDP's gradient sync) that failed
    because of another rank, or None for any other error. torch raises these as RuntimeError (or its
    DistBackendError) with the backend's text: gloo says "Timed out waiting 10000ms for recv operation"
    when a rank stops arriving (SIGSTOP, a hung node) and "Connection closed by peer" when one ended."""
    if not isinstance(err, RuntimeError) or _world_size() < 2:
        return None
    import torch.distributed as dist

    text = str(err)
    from_backend = isinstance(err, dist.DistError) or any(k in text for k in ("gloo", "c10d", "NCCL", "ProcessGroup"))
    if not from_backend:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialized else int(os.environ.get("RANK", "0"))
    world = dist.get_world_size() if initialized else _world_size()
    if _TIMED_OUT.search(text):
        # With two ranks the missing one is the other; with more, the backend does not say which.
        who = f"rank {1 - rank}" if world == 2 else "a rank"
        return (f"error: {who} did not arrive at a collective within {timeout_s:g} s (stopped, hung, or its node is gone; "
                f"rank {rank} gave up); find and fix that rank's node, then run the same command again to resume from the "
                f"newest checkpoint (train.collective_timeout_s sets the wait)", COLLECTIVE_TIMEOUT_EXIT)
    if _PEER_GONE.search(text):
        return (f"aedist: rank {rank} stops: another rank ended while it waited at a collective; that rank's own message "
                f"says why", PEER_LOST_EXIT)
    return None
