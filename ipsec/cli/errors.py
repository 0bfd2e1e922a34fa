"""Exit codes scripts can rely on, and the error that carries one to `main`."""
from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    PROBLEM = 1          # doctor found a problem (drift, missing socket, ...), or a kernel error
    USAGE = 2            # bad option, define or parameter value
    STORE = 3            # store missing, empty, unreadable or of another schema version
    PERMISSION = 4       # no permission on the store file, the kernel's XFRM or the namespace
    NO_ESP = 5           # doctor: the kernel cannot hold ESP SAs
    NOT_FOUND = 6        # show / drop: no contact matches
    NOT_CONFIRMED = 7    # flush: not confirmed (no --yes and no "yes" typed)


class CliError(Exception):
    """A command cannot go on; `code` is the exit code, the text says why and what to do."""

    def __init__(self, code: Exit, text: str) -> None:
        super().__init__(text)
        self.code = code
