"""The S-CSCF stub: one UDP socket, answers as fast as one Python handler can.

REGISTER without a response -> 401 with a fresh nonce and the CK/IK that nonce gives
(`ue_ipsec.aka`); REGISTER with a response -> 200 with the Contact's expiry and the Path
echoed, or 403 when the response does not match its nonce; MESSAGE -> 200. It sends MT
MESSAGEs to registered phones through the P-CSCF (Path as Route) and hands their final
responses to the phone that waits for them.
"""
from __future__ import annotations

import itertools
import secrets
import socket
from collections.abc import Callable

from . import sip
from .ue_ipsec import aka

MtWaiter = Callable[[int, bytes], None]


class Scscf:
    def __init__(self, sock: socket.socket, pcscf: tuple[str, int]) -> None:
        self.sock = sock
        self.addr = sock.getsockname()
        self.pcscf = pcscf  # where MT requests enter the P-CSCF
        self.paths: dict[bytes, bytes] = {}  # AoR -> Path URI of its last 200 OK
        self.contacts: dict[bytes, bytes] = {}  # AoR -> registered contact URI
        self.mt: dict[bytes, MtWaiter] = {}  # Call-ID of an MT request -> who waits
        self.without_path = 0  # REGISTERs that reached us without a Path
        self._ids = itertools.count(1)
        self._run = secrets.token_hex(4).encode()

    def on_datagram(self, _port: int, data: bytes, addr: tuple[str, int]) -> None:
        if data.startswith(b"SIP/2.0 "):
            self._on_response(data)
        elif data.startswith(b"REGISTER "):
            self._on_register(data, addr)
        elif data.startswith(b"MESSAGE "):
            self.sock.sendto(sip.reply(data, b"200 OK", self._tag()), addr)

    def _tag(self) -> bytes:
        return b"%x%s" % (next(self._ids), self._run)

    def _on_register(self, data: bytes, addr: tuple[str, int]) -> None:
        aor = sip.first(sip.TO_URI, data) or b""
        res = sip.first(sip.RESPONSE, data)
        if not res:
            self.sock.sendto(self._challenge(data, aor), addr)
            return
        nonce = sip.first(sip.NONCE, data) or b""
        if aka(aor.decode(), nonce)[2].encode() != res:
            self.sock.sendto(sip.reply(data, b"403 Forbidden - Bad Response", self._tag()), addr)
            return
        self.sock.sendto(self._registered(data, aor), addr)

    def _challenge(self, data: bytes, aor: bytes) -> bytes:
        nonce = secrets.token_hex(16).encode()
        ck, ik, _ = aka(aor.decode(), nonce)
        auth = (b'WWW-Authenticate: Digest realm="ims.test", nonce="%s", algorithm=AKAv1-MD5, '
                b'ck="%s", ik="%s", qop="auth"\r\n' % (nonce, ck.hex().encode(), ik.hex().encode()))
        return sip.reply(data, b"401 Unauthorized - Challenging the UE", self._tag(), auth)

    def _registered(self, data: bytes, aor: bytes) -> bytes:
        extra = b""
        m = sip.CONTACT.search(data)
        if m:
            uri, tail = m.group(1), m.group(2)
            expires = sip.first(sip.EXPIRES_PARAM, tail) or sip.first(sip.EXPIRES, data) or b"600"
            extra += b"Contact: <%s>;expires=%s\r\n" % (uri, expires)
            self.contacts[aor] = uri
        path = sip.first(sip.PATH, data)
        if path:
            extra += b"Path: %s\r\n" % path
            self.paths[aor] = path.split(b"<", 1)[-1].split(b">", 1)[0]
        else:
            self.without_path += 1
        return sip.reply(data, b"200 OK", self._tag(), extra)

    def mt_message(self, aor: bytes, on_final: MtWaiter) -> bytes | None:
        """An MT MESSAGE to the phone's registered contact through its Path, or None when we
        never saw it registered with a Path. `on_final(status, response)` gets its answer."""
        path, contact = self.paths.get(aor), self.contacts.get(aor)
        if path is None or contact is None:
            return None
        call_id = b"mt%x.%s" % (next(self._ids), self._run)
        self.mt[call_id] = on_final
        host, port = self.addr
        return (b"MESSAGE %s SIP/2.0\r\n"
                b"Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK%s\r\n"
                b"Max-Forwards: 70\r\n"
                b"Route: <%s>\r\n"
                b"From: <sip:scscf@ims.test>;tag=%s\r\n"
                b"To: <%s>\r\n"
                b"Call-ID: %s\r\n"
                b"CSeq: 1 MESSAGE\r\n"
                b"Content-Type: text/plain\r\n"
                b"Content-Length: 2\r\n\r\nhi"
                % (contact, host.encode(), port, call_id, path, self._tag(), aor, call_id))

    def _on_response(self, data: bytes) -> None:
        if sip.status_of(data) < 200:
            return
        waiter = self.mt.pop(sip.first(sip.CALL_ID, data) or b"", None)
        if waiter is not None:
            waiter(sip.status_of(data), data)
