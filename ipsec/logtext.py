"""Log lines carry what phones wrote (AoRs, URIs, methods, header values): never raw.

A CR or LF in a value would start a forged line in the operator's log, an ESC would drive
their terminal, a right-to-left override would reorder what they read. Everything that is not
printable (Unicode categories C* and Z* but the plain space) is written as a Python escape,
and an overlong value is cut, saying so.
"""
from __future__ import annotations

MAX_CHARS = 2000


def clean(text: object) -> str:
    """`text` as one printable line (no newline: the caller adds Kamailio's own)."""
    s = str(text)
    if len(s) > MAX_CHARS:
        s = s[:MAX_CHARS] + f"...({len(s) - MAX_CHARS} more)"
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in s)
