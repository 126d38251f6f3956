"""User errors and how the command line reports them.

Library code raises ``ValueError`` / ``TypeError`` naming what was given and what is allowed. Code
that checks the user's own input (flags, data files, checkpoints, the disk) raises ``UserError`` (a
``ValueError``). ``cli`` runs an entry point and prints every user error as one line of stderr,
``error: <message>`` (several independent problems found together: one such line each), exiting
with status 2 and no traceback; ``SDPO_FAST_TRACEBACK=1`` re-raises
instead, for debugging.
"""

from __future__ import annotations

import errno
import os
import sys

__all__ = ["UserError", "disk_full", "cli", "one_line"]


class UserError(ValueError):
    """A problem with the user's input or environment; the CLI prints it on one line."""


def one_line(message) -> str:
    """``message`` with its lines joined by ``"; "`` (a user error is one line of stderr)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` or an exception it was raised from is ``OSError(ENOSPC)`` (or torch's
    writer's report of one)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _user_message(exc: BaseException) -> str | None:
    """The one-line message of a user error, None for anything else (a bug: keep its traceback)."""
    from .data.loaders import DataFormatError

    if isinstance(exc, SystemExit):
        return one_line(exc.code) if isinstance(exc.code, str) else None
    if isinstance(exc, UserError):
        return str(exc)  # one problem per line (``config.validate`` reports all it finds)
    if disk_full(exc):
        where = getattr(exc, "filename", None)
        return f"the disk is full (no space left on device){f' writing {where}' if where else ''}: {one_line(exc)}"
    if isinstance(exc, DataFormatError):
        return one_line(exc)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return one_line(exc)
    return None


def cli(fn, argv=None) -> int:
    """``fn(argv)``, with user errors printed as ``error: ...`` lines on stderr and ``SystemExit(2)``."""
    try:
        return fn(argv)
    except BaseException as exc:  # noqa: BLE001  (SystemExit and KeyboardInterrupt included)
        if isinstance(exc, SystemExit) and not isinstance(exc.code, str):
            raise
        message = _user_message(exc)
        if message is None or os.environ.get("SDPO_FAST_TRACEBACK", "0") not in ("", "0"):
            raise
        for line in message.splitlines() or [""]:
            print(f"error: {line.strip()}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
