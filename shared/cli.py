"""How every command line ends on a user error: one line naming what is wrong, exit status 2.

Tracebacks are for developers: ``--debug`` lets the exception through. Errors that are not the
user's (a bug) are not caught here, so they still show where they came from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shared.errors import ConfigError, ProtocolError

# What a user can cause: a bad config or data file, a wrong path, a refused message, a file that
# would be overwritten. LinkError (the broker) is added by the callers that import fl_mqtt.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ProtocolError, ValueError, FileExistsError,
                                                FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def add_debug(ap: object) -> None:
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")  # type: ignore[attr-defined]


def run(body: Callable[[], int | None], log: logging.Logger, *, debug: bool,
        extra: tuple[type[BaseException], ...] = ()) -> int:
    try:
        rc = body()
    except USER_ERRORS + extra as e:
        if debug:
            raise
        msg = str(e).strip() or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        log.error("%s", msg.splitlines()[0] if len(msg) > 2000 else msg)
        return 2
    return rc or 0
