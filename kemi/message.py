"""The current SIP message seen through KSR: the only place the module's functions meet Kamailio.

`ipsec.module` takes any object with this shape; here it is built over KSR (real Kamailio, or
the test double in kemi/double, which answers the same calls from raw SIP text).
"""
from __future__ import annotations

from ipsec.module import Refused
from ipsec.sipuri import Address

import KSR


def _pv(name: str):
    return KSR.pv.get(name)


# What a route may change while it runs (the destination URI, the send socket): never cached.
_VOLATILE = frozenset(("$du", "$fs"))


class _Reading:
    """Reads through pseudo-variables, optionally wrapped (the transaction's request: $T_req).

    A route asks for the same few values many times (the module's functions each look at the
    source, the local socket, Via, Contact...): each is read from Kamailio once per message.
    Headers never change under a route (changes are lumps, applied at send time); the source
    and local socket change only through `set_reply_path`, which forgets them.
    """

    def __init__(self, wrap: str = "{}") -> None:
        self._wrap = wrap
        self._memo: dict[str, object] = {}
        self.memo: dict[str, object] = {}  # the module's look-ups for this message

    def _get(self, pv: str):
        if pv in _VOLATILE:
            return _pv(self._wrap.format(pv))
        try:
            return self._memo[pv]
        except KeyError:
            value = self._memo[pv] = _pv(self._wrap.format(pv))
            return value

    def method(self) -> str:
        return self._get("$rm") or ""

    def header(self, name: str) -> str | None:
        """All values of a header (repeated headers joined by commas, as SIP allows), or None."""
        return self._get(f"$(hdr({name})[*])")

    def first_header(self, name: str) -> str | None:
        return self._get(f"$hdr({name})")

    def source(self) -> Address:
        return Address(self._get("$si"), int(self._get("$sp")), self._get("$pr"))

    def local(self) -> Address:
        return Address(self._get("$Ri"), int(self._get("$Rp")), self._get("$pr"))

    def ruri(self) -> str:
        return self._get("$ru") or ""

    def dst_uri(self) -> str | None:
        return self._get("$du")


class KsrMessage(_Reading):
    """The message of the running route (request or reply); make one per callback."""

    def __init__(self) -> None:
        super().__init__()
        self._request: _Reading | None = None

    def is_request(self) -> bool:
        return self._get("$rs") is None

    def status(self) -> int | None:
        return self._get("$rs")

    def original_ruri(self) -> str:
        return self._get("$ou") or ""

    def request(self) -> _Reading:
        """The transaction's request, for a reply (needs tmx)."""
        if self._request is None:
            self._request = _Reading("$T_req({})")
        return self._request

    def append_header(self, name: str, value: str) -> None:
        KSR.hdr.append(f"{name}: {value}\r\n")

    def remove_header(self, name: str) -> None:
        KSR.hdr.remove(name)

    def note(self, name: str, value: int) -> None:
        """An integer for the rest of the transaction (an AVP: TM keeps it with the
        transaction, so its reply routes read it back with `noted`)."""
        KSR.pv.seti(f"$avp({name})", value)

    def noted(self, name: str) -> int | None:
        value = _pv(f"$avp({name})")
        return value if isinstance(value, int) else None

    def set_dst_uri(self, uri: str) -> None:
        KSR.setdsturi(uri)

    def set_send_socket(self, sock: str) -> None:
        # corex answers 1 even when no listen socket matches, and the request would then
        # leave from 5060, outside the SAs: check that it took.
        KSR.corex.set_send_socket(sock)
        if _pv("$fs") is None:
            raise Refused(f"no listen socket {sock}: not sending outside the SAs")

    def set_reply_path(self, sock: str, target: str) -> None:
        """Where TM will send this request's replies (call before t_relay; see README)."""
        try:
            KSR.corex.set_recv_socket(sock)
            if str(_pv("$Rp")) != sock.rsplit(":", 1)[1]:
                raise Refused(f"no listen socket {sock}: replies would leave outside the SAs")
            KSR.corex.set_source_address(target)
        finally:
            self._memo.clear()  # $Ri, $Rp, $pr, $si, $sp have changed
            self.memo.clear()
