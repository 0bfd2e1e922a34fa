"""Kernel refusals as typed errors: the operation, the errno and the object, never its keys.

They are our side's failures (kernel or configuration), unlike a phone's bad offer: the caller
answers the phone with a server error and logs the message, which is safe to log.
"""
from __future__ import annotations

import errno as errno_names
import os


class XfrmError(OSError):
    """The kernel refused an XFRM request (or a dump failed)."""

    def __init__(self, op: str, err: int, what: object, detail: str = "") -> None:
        name = errno_names.errorcode.get(err, str(err))
        text = f"{op} {what}: {name} ({os.strerror(err)})"
        if detail:
            text += f": {detail}"
        super().__init__(err, text)
        self.op = op
        self.what = what
        self.detail = detail

    def __str__(self) -> str:
        return str(self.strerror)


class XfrmExists(XfrmError):
    """EEXIST: an SA with this (dst, SPI) or a policy with this selector is already there."""


class XfrmNotFound(XfrmError):
    """ENOENT/ESRCH: no such SA or policy (already removed, or never added)."""


_BY_ERRNO = {
    errno_names.EEXIST: XfrmExists,
    errno_names.ENOENT: XfrmNotFound,
    errno_names.ESRCH: XfrmNotFound,
}


def xfrm_error(op: str, err: int, what: object, detail: str = "") -> XfrmError:
    return _BY_ERRNO.get(err, XfrmError)(op, err, what, detail)
