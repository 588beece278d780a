"""User-facing errors: one line, exit code 2, no traceback.

Library code raises :class:`UserError` for mistakes a user can fix (a typo in a config key, a missing
shards folder, a truncated shard, a checkpoint from another model). Entry scripts wrap ``main`` in
:func:`run_cli`, which turns the error into ``error: <message>`` on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix; its message names the problem and the fix on one line."""


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; exit with its return code, or 2 with a one-line message on UserError."""
    try:
        code = main(list(sys.argv[1:] if argv is None else argv))
    except UserError as err:
        msg = " ".join(str(err).split())  # always one line, however the message was built
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    sys.exit(code or 0)
