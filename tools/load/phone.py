"""One simulated phone: its own address and ports, one transaction at a time, RFC 3261 UDP
retransmissions, and the checks that turn a wrong answer into a named failure cause.

A phone is driven by the engine's event loop: `start_*` sends the first request of a step,
the engine hands it every datagram that reaches its sockets and every timer it asked for, and
the phone calls `engine.finish` once with None (done) or a cause. Nothing blocks.

Ports (33.203 7.1, 7.4): `port_plain` sends the unprotected REGISTER; `port_us` is the
protected server port, kept on re-registration; `port_uc` alternates between two client
ports, a new one for each new SA set, as the re-key asks.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import sip
from .engine import STRAY
from .ue_ipsec import UeTunnel, aka, drop_requests, install_requests

if TYPE_CHECKING:
    from .engine import Engine

T1, T2 = 0.5, 4.0  # RFC 3261 timer values: first retransmission, cap for non-INVITE
EXPIRES = 3600  # long enough that no registration expires during a run
SPI_BASE = 0x10000000  # the phones' own SPIs: far from any P-CSCF range
PCSCF_SIP_PORT = 5060

Final = Callable[[int, bytes, int, tuple], None]


class Phone:
    """A UE. `tunnel` is the SA set in use, `pending` the one its last 401 announced."""

    def __init__(self, idx: int, ip: str, base_port: int, engine: Engine,
                 offer: tuple[str, str]) -> None:
        self.idx, self.ip, self.eng, self.offer = idx, ip, engine, offer
        self.user = f"u{idx}"
        self.aor = f"sip:{self.user}@ims.test"
        self.port_plain, self.port_us = base_port, base_port + 1
        self.ports_uc = (base_port + 2, base_port + 3)
        self.socks: dict[int, socket.socket] = {}
        self.gen = 0  # which client port and SPI pair the current offer uses
        self.call_id = f"{idx:x}.{engine.run_id}"
        self.tag = f"p{idx:x}"
        self.cseq = 0
        self.tunnel: UeTunnel | None = None
        self.server = ""  # the Security-Server of `tunnel`: our Security-Verify
        self.pending: UeTunnel | None = None
        self.pending_server = ""
        self.previous: UeTunnel | None = None  # the SA set a re-key replaced
        self.nonce, self.res = "", ""
        self.expires = EXPIRES  # what our REGISTERs ask for (tools/soak: short, or 0)
        self.failed: str | None = None
        self.mt_seen = False
        self.in_phase = False  # engine-owned: counted in the running phase
        self.t_start = 0.0
        # the transaction in progress
        self.waiting = False
        self.token = 0
        self.step = ""
        self.tx: tuple[socket.socket, tuple[str, int], bytes] | None = None
        self.tx_cseq, self.tx_method = 0, b""
        self.final = b""  # the final response that ended the last transaction
        self.doubled = ""  # what a second, different final response showed, until a success
        self.interval = T1
        self.deadline = 0.0
        self.on_final: Final = _never

    # -- the offer and the messages -------------------------------------------------------
    @property
    def port_uc(self) -> int:
        return self.ports_uc[self.gen]

    @property
    def spi_uc(self) -> int:
        return SPI_BASE + 4 * self.idx + 2 * self.gen

    @property
    def spi_us(self) -> int:
        return self.spi_uc + 1

    def security_client(self) -> str:
        alg, ealg = self.offer
        return (f"ipsec-3gpp;alg={alg};ealg={ealg};prot=esp;mod=trans;spi-c={self.spi_uc};"
                f"spi-s={self.spi_us};port-c={self.port_uc};port-s={self.port_us}")

    def _register(self, verify: str) -> bytes:
        self.cseq += 1
        ip, user = self.ip, self.user
        return (f"REGISTER sip:ims.test SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {ip}:{self.port_us};branch=z9hG4bK{self.call_id}.{self.cseq};rport\r\n"
                f"Max-Forwards: 70\r\n"
                f"From: <{self.aor}>;tag={self.tag}\r\n"
                f"To: <{self.aor}>\r\n"
                f"Call-ID: {self.call_id}\r\n"
                f"CSeq: {self.cseq} REGISTER\r\n"
                f"Contact: <sip:{user}@{ip}:{self.port_us}>;expires={self.expires}\r\n"
                f"Expires: {self.expires}\r\n"
                f"Supported: path, sec-agree\r\n"
                f"Require: sec-agree\r\n"
                f"Proxy-Require: sec-agree\r\n"
                f"Security-Client: {self.security_client()}\r\n"
                + (f"Security-Verify: {verify}\r\n" if verify else "")
                + f'Authorization: Digest username="{user}@ims.test", realm="ims.test", '
                f'nonce="{self.nonce}", uri="sip:ims.test", response="{self.res}"\r\n'
                f"Content-Length: 0\r\n\r\n").encode()

    def _message(self, t: UeTunnel) -> bytes:
        self.cseq += 1
        ip = self.ip
        return (f"MESSAGE sip:bob@ims.test SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {ip}:{t.port_us};branch=z9hG4bK{self.call_id}.{self.cseq};rport\r\n"
                f"Max-Forwards: 70\r\n"
                f"Route: <sip:{t.pcscf}:{t.port_ps};lr>\r\n"
                f"From: <{self.aor}>;tag={self.tag}\r\n"
                f"To: <sip:bob@ims.test>\r\n"
                f"Call-ID: mo.{self.cseq}.{self.call_id}\r\n"
                f"CSeq: {self.cseq} MESSAGE\r\n"
                f"Security-Verify: {self.server}\r\n"
                f"Require: sec-agree\r\n"
                f"Proxy-Require: sec-agree\r\n"
                f"Content-Type: text/plain\r\n"
                f"Content-Length: 2\r\n\r\nhi").encode()

    # -- one transaction ----------------------------------------------------------------
    def _transact(self, step: str, sport: int, dest: tuple[str, int], data: bytes,
                  method: bytes, on_final: Final) -> None:
        self.step, self.on_final = step, on_final
        self.tx = (self.socks[sport], dest, data)
        self.tx_cseq, self.tx_method = self.cseq, method
        self._begin()

    def _begin(self) -> None:
        self.token += 1
        self.waiting = True
        self.interval = T1
        now = self.eng.clock
        self.deadline = now + self.eng.timeout
        self._send()
        self.eng.schedule(now + T1, self, self.token)

    def _send(self) -> None:
        sock, dest, data = self.tx
        try:
            sock.sendto(data, dest)
        except OSError as e:  # e.g. no SA yet for an IPsec policy: the timer tries again
            self.eng.note(f"send error: {self.step}: {e.strerror}")

    def on_timer(self, now: float) -> None:
        """Timer E: retransmit at 0.5 s, doubling up to 4 s, until the deadline."""
        if now >= self.deadline:
            self.fail(f"{self.step}: timeout")
            return
        self._send()
        self.eng.retransmitted()
        self.interval = min(self.interval * 2, T2)
        self.eng.schedule(min(now + self.interval, self.deadline), self, self.token)

    def fail(self, cause: str) -> None:
        self.waiting = False
        if self.doubled:
            cause += f"; earlier: {self.doubled}"
        self.failed = cause
        self.eng.finish(self, cause)

    def forget_failure(self) -> None:
        """A new start (the relay comparison): what went wrong before does not count."""
        self.failed, self.doubled = None, ""

    def done(self) -> None:
        self.waiting = False
        self.doubled = ""
        self.eng.finish(self, None)

    # -- what reaches our sockets --------------------------------------------------------
    def on_datagram(self, port: int, data: bytes, addr: tuple) -> None:
        if not data.startswith(b"SIP/2.0 "):
            self._on_request(port, data, addr)
            return
        if not self.waiting or sip.cseq(data) != (self.tx_cseq, self.tx_method):
            self._stray(data)
            return
        status = sip.status_of(data)
        if status >= 200:
            self.waiting = False
            self.final = data
            self.on_final(status, data, port, addr)

    def _stray(self, data: bytes) -> None:
        """A response for no transaction in progress. The same bytes as the final response we
        took: the proxy answering a retransmission again, as RFC 3261 17.2.2 has it. Other
        bytes for the same CSeq: our retransmission became a transaction of its own, and its
        answer (another nonce, other SAs, an error) disagrees with the one we acted on."""
        status, (num, method) = sip.status_line(data), sip.cseq(data)
        name = method.decode(errors="replace")
        if data == self.final:
            kind = f"the final {status} to {name} again"
        elif self.final and (num, method) == sip.cseq(self.final) and sip.status_of(data) >= 200:
            self.doubled = f"two different final responses ({sip.status_of(self.final)}, " \
                           f"{sip.status_of(data)}) to one {name}"
            kind = f"a second, different final {status} to {name}"
        else:
            kind = f"late {status} to {name}"
        self.eng.note(STRAY + kind)

    def _on_request(self, port: int, data: bytes, addr: tuple) -> None:
        """An MT MESSAGE must come through the SAs: to port_us from port_pc. Answered 200 to
        its top Via, which must be port_pc too (the only way back through an SA)."""
        if not data.startswith(b"MESSAGE "):
            self.eng.note(f"unexpected request at a phone: {data[:data.find(b' ')].decode(errors='replace')}")
            return
        t = self.tunnel
        via = sip.top_via(data)
        if t is None or port != self.port_us or addr[1] != t.port_pc:
            self._mt_wrong(f"arrived on {self._name(port)} from P-CSCF port {self._peer(addr[1])}")
            return
        if via is None or via[1] != t.port_pc:
            self._mt_wrong("top Via is not the P-CSCF's port_pc")
            return
        self.mt_seen = True
        self.socks[port].sendto(sip.reply(data, b"200 OK", self.tag.encode()), via)

    def _mt_wrong(self, why: str) -> None:
        if self.waiting and self.step == "MT MESSAGE":
            self.fail(f"MT MESSAGE: {why}")
        else:
            self.eng.note(f"MT MESSAGE outside the MT step: {why}")

    def _name(self, port: int) -> str:
        if port == self.port_us:
            return "port_us"
        return "port_uc" if port in self.ports_uc else "the plain port"

    def _peer(self, port: int) -> str:
        names = {PCSCF_SIP_PORT: "5060"}
        for label, t in (("", self.pending), ("old ", self.tunnel)):
            if t is not None:
                names.setdefault(t.port_pc, label + "port_pc")
                names.setdefault(t.port_ps, label + "port_ps")
        return names.get(port, "other")

    def _check_arrival(self, port: int, addr: tuple, t: UeTunnel) -> str | None:
        """A UDP reply through the SAs arrives on port_us from port_pc (our Via port)."""
        if port == t.port_us and addr[1] == t.port_pc:
            return None
        return f"arrived on {self._name(port)} from P-CSCF port {self._peer(addr[1])}"

    # -- step: REGISTER -> 401 ------------------------------------------------------------
    def start_challenge(self) -> None:
        """Unprotected REGISTER from the plain port; the 401 must carry a usable
        Security-Server and no keys."""
        self.nonce = self.res = ""
        self._transact("401 step", self.port_plain, (self.eng.pcscf, PCSCF_SIP_PORT),
                       self._register(""), b"REGISTER", self._on_first_401)

    def _on_first_401(self, status: int, data: bytes, port: int, addr: tuple) -> None:
        cause = self._take_challenge(status, data)
        self.fail(f"401 step: {cause}") if cause else self.done()

    def _take_challenge(self, status: int, data: bytes) -> str | None:
        """Check a 401 and learn the SA set it announces (`pending`) and our keys."""
        if status != 401:
            return f"status {sip.status_line(data)}"
        if sip.KEYS.search(data):
            return "CK/IK reached the phone"
        server = sip.first(sip.SECURITY_SERVER, data)
        if server is None:
            return "401 without Security-Server"
        nonce = sip.first(sip.NONCE, data)
        if nonce is None:
            return "401 without a nonce"
        p = sip.params(server)
        if (p.get("alg"), p.get("ealg", "null")) != self.offer:
            return "Security-Server names algorithms we did not offer"
        try:
            spi_pc, spi_ps = int(p["spi-c"]), int(p["spi-s"])
            port_pc, port_ps = int(p["port-c"]), int(p["port-s"])
        except (KeyError, ValueError):
            return "Security-Server without usable SPIs/ports"
        self.nonce = nonce.decode()
        ck, ik, self.res = aka(self.aor, nonce)
        self.pending = UeTunnel(self.eng.pcscf, self.ip, port_pc, port_ps, self.port_uc,
                                self.port_us, spi_pc, spi_ps, self.spi_uc, self.spi_us,
                                self.offer[0], self.offer[1], ck, ik)
        self.pending_server = server.decode()
        return None

    # -- between the phases, untimed: the SAs the 401 announced ---------------------------
    def start_install(self) -> None:
        self.step = "phone's SAs"
        self.eng.xfrm(install_requests(self.pending), self._on_installed)

    def _on_installed(self, error: str | None) -> None:
        self.fail(f"{self.step}: {error}") if error else self.done()

    # -- step: protected REGISTER -> 200 -------------------------------------------------
    def start_authenticate(self) -> None:
        """Through the SAs of the last 401: port_uc -> port_ps; the 200 back to port_us from
        port_pc."""
        t = self.pending
        self._transact("protected REGISTER", t.port_uc, (t.pcscf, t.port_ps),
                       self._register(self.pending_server), b"REGISTER", self._on_200)

    def _on_200(self, status: int, data: bytes, port: int, addr: tuple) -> None:
        cause = self._registered(status, data, port, addr)
        self.fail(f"{self.step}: {cause}") if cause else self.done()

    def _registered(self, status: int, data: bytes, port: int, addr: tuple) -> str | None:
        if status != 200:
            return f"status {sip.status_line(data)}"
        cause = self._check_arrival(port, addr, self.pending)
        if cause:
            return f"200 {cause}"
        self.tunnel, self.server = self.pending, self.pending_server
        return None

    # -- step: MO and MT MESSAGE ---------------------------------------------------------
    def start_mo(self) -> None:
        t = self.tunnel
        self._transact("MO MESSAGE", t.port_uc, (t.pcscf, t.port_ps), self._message(t),
                       b"MESSAGE", self._on_mo_final)

    def _on_mo_final(self, status: int, data: bytes, port: int, addr: tuple) -> None:
        if status != 200:
            self.fail(f"MO MESSAGE: status {sip.status_line(data)}")
            return
        cause = self._check_arrival(port, addr, self.tunnel)
        self.fail(f"MO MESSAGE: 200 {cause}") if cause else self.done()

    def start_mt(self) -> None:
        """The S-CSCF sends a MESSAGE to our contact through the P-CSCF; its retransmissions
        are ours to time (the stub is one socket with no timers of its own)."""
        stub = self.eng.stub
        self.mt_seen = False
        token = self.token + 1
        data = stub.mt_message(self.aor.encode(),
                               lambda status, resp: self._on_mt_final(token, status, resp))
        if data is None:
            self.fail("MT MESSAGE: the S-CSCF never saw this phone registered with a Path")
            return
        self.step, self.on_final = "MT MESSAGE", _never
        self.tx = (stub.sock, stub.pcscf, data)
        self.tx_cseq, self.tx_method = 1, b"MT"  # never matches a response at the phone
        self._begin()

    def _on_mt_final(self, token: int, status: int, data: bytes) -> None:
        if not self.waiting or token != self.token:
            self.eng.note(f"{STRAY}{sip.status_line(data)} to MT MESSAGE at the S-CSCF")
        elif status != 200:
            self.fail(f"MT MESSAGE: the S-CSCF got {sip.status_line(data)}")
        elif not self.mt_seen:
            self.fail("MT MESSAGE: 200 at the S-CSCF that the phone never sent")
        else:
            self.done()

    # -- step: re-registration with new keys, SPIs and client port (33.203 7.4) ----------
    def start_rekey(self) -> None:
        """A new offer (other client port and SPIs, same port_us) in a REGISTER through the
        current SAs; its 401 brings the new SA set, which we install, then the protected
        REGISTER goes through the new SAs, its 200 comes back through them, and the old SAs
        are dropped."""
        old = self.tunnel
        self.gen ^= 1
        self.nonce = self.res = ""
        self._transact("re-key 401", old.port_uc, (old.pcscf, old.port_ps),
                       self._register(self.server), b"REGISTER", self._on_rekey_401)

    def _on_rekey_401(self, status: int, data: bytes, port: int, addr: tuple) -> None:
        cause = self._take_challenge(status, data)
        if cause:
            self.fail(f"re-key 401: {cause}")
            return
        self.step = "re-key: phone's new SAs"
        self.eng.xfrm(install_requests(self.pending), self._on_new_sas)

    def _on_new_sas(self, error: str | None) -> None:
        if error:
            self.fail(f"{self.step}: {error}")
            return
        t = self.pending
        self._transact("re-key REGISTER", t.port_uc, (t.pcscf, t.port_ps),
                       self._register(self.pending_server), b"REGISTER", self._on_rekey_200)

    def _on_rekey_200(self, status: int, data: bytes, port: int, addr: tuple) -> None:
        old = self.tunnel
        cause = self._registered(status, data, port, addr)
        if cause:
            self.fail(f"re-key REGISTER: {cause}")
            return
        self.step = "re-key: dropping the old SAs"
        self.previous = old
        self.eng.xfrm(drop_requests(old), self._on_old_dropped)

    def _on_old_dropped(self, error: str | None) -> None:
        self.fail(f"{self.step}: {error}") if error else self.done()

    # -- the relay comparison: the same two REGISTERs, no IPsec -------------------------
    def start_relay_challenge(self) -> None:
        self.nonce = self.res = ""
        self._transact("relay 401 step", self.port_plain, (self.eng.pcscf, PCSCF_SIP_PORT),
                       self._register(""), b"REGISTER", self._on_relay_401)

    def _on_relay_401(self, status: int, data: bytes, port: int, addr: tuple) -> None:
        nonce = sip.first(sip.NONCE, data)
        if status != 401 or nonce is None:
            self.fail(f"relay 401 step: status {sip.status_line(data)}")
            return
        self.nonce = nonce.decode()
        self.res = aka(self.aor, nonce)[2]
        self.done()

    def start_relay_authenticate(self) -> None:
        self._transact("relay REGISTER", self.port_plain, (self.eng.pcscf, PCSCF_SIP_PORT),
                       self._register(""), b"REGISTER", self._on_relay_200)

    def _on_relay_200(self, status: int, data: bytes, port: int, addr: tuple) -> None:
        if status != 200:
            self.fail(f"relay REGISTER: status {sip.status_line(data)}")
        else:
            self.done()


def _never(status: int, data: bytes, port: int, addr: tuple) -> None:
    raise AssertionError("no response is expected at the phone in this step")
