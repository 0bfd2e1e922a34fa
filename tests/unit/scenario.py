"""What the module and routing tests share: an in-memory kernel, SIP text, a P-CSCF to drive.

The P-CSCF here is the real thing (`ipsec.module.Module` built from kamailio.cfg-style
defines, `kemi.routing.Routing`, `kemi.message.KsrMessage`) over the KSR double and a real
SQLite store; only the kernel is replaced, by `FakeKernel`, which decodes the very netlink
requests `ipsec.tunnel` encodes and keeps the kernel's rules that matter: an SA is keyed by
(destination, SPI), a policy by (direction, selector), and adding either twice is refused.
"""
from __future__ import annotations

import errno
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import KSR

from ipsec.module import Module
from ipsec.params import Params
from ipsec.xfrm import Dir, Flushed, Request, Selector, XfrmExists, XfrmNotFound, codec
from ipsec.xfrm import structs as k
from ipsec.xfrm.errors import XfrmError, xfrm_error
from ipsec.xfrm.model import PolicyInfo, SAInfo
from kemi.message import KsrMessage
from kemi.routing import Routing

PCSCF = "10.0.0.1"
CORE = "10.0.0.9"
UE = "10.0.0.2"
DOMAIN = "location"
AOR = "sip:alice@ims.example"
CK = "0123456789abcdef0123456789abcdef"
IK = "fedcba9876543210fedcba9876543210"
OFFER = ("ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;spi-c=1111;spi-s=2222;"
         "port-c=31000;port-s=31001")
PORT_UC, PORT_US = 31000, 31001
CLIENT_PORT, SERVER_PORT = 5100, 5200


def defines(store_path: str, **overrides: str) -> dict[str, str]:
    """kamailio.cfg's defines as KSR.kx.get_def returns them (strings keep their quotes)."""
    values = {
        "PCSCF_IP": PCSCF,
        "NEXT_HOP": f'"sip:{CORE}:5060"',
        "IPSEC_LISTEN_ADDR": f'"{PCSCF}"',
        "IPSEC_LISTEN_ADDR6": '""',
        "IPSEC_CLIENT_PORT": str(CLIENT_PORT),
        "IPSEC_SERVER_PORT": str(SERVER_PORT),
        "IPSEC_MAX_CONNECTIONS": "2",
        "IPSEC_REUSE_SERVER_PORT": "1",
        "IPSEC_SPI_ID_START": "4096",
        "IPSEC_SPI_ID_RANGE": "100",
        "IPSEC_PREFERRED_ALG": '""',
        "IPSEC_PREFERRED_EALG": '""',
        "IPSEC_STORE": f'"{store_path}"',
        "EXPIRY_GRACE": "30",
    }
    values.update(overrides)
    return values


def listen_sockets(params: Params) -> list[str]:
    """The sockets Kamailio listens on with our kamailio.cfg: 5060 from its listen lines, and
    UDP and TCP on every protected port (bound from the same defines, see kamailio.cfg)."""
    out = [f"udp:{PCSCF}:5060", f"tcp:{PCSCF}:5060"]
    for port in [*params.client_ports, *params.server_ports]:
        out += [f"udp:{params.ipsec_listen_addr}:{port}", f"tcp:{params.ipsec_listen_addr}:{port}"]
    return out


# -- the kernel ----------------------------------------------------------------------------

class FakeKernel:
    """The kernel's SAD and SPD in memory, fed the encoded requests of `ipsec.xfrm.codec`.

    `refuse(request)` may return an errno to refuse that request (an unsupported algorithm,
    a full table...), as the kernel answers one message of a batch without stopping the rest.
    """

    def __init__(self) -> None:
        self.sas: dict[tuple[str, int], SAInfo] = {}
        self.policies_by_id: dict[tuple[Dir, Selector], PolicyInfo] = {}
        self.refuse: Callable[[Request], int | None] = lambda request: None
        self._index = itertools.count(8, 8)
        self.closed = 0
        self.clock: Callable[[], float] = time.time  # the add_time of what is added

    def close(self) -> None:
        """As Xfrm.close: the socket goes, the kernel's tables stay."""
        self.closed += 1

    def batch(self, requests: list[Request]) -> list[XfrmError | None]:
        return [self._one(r) for r in requests]

    def _one(self, r: Request) -> XfrmError | None:
        err = self.refuse(r)
        if err:
            return xfrm_error(r.op, err, r.what)
        now = int(self.clock())
        if r.type == k.XFRM_MSG_NEWSA:
            sa = codec.decode_sa(memoryview(r.body), 0, len(r.body))
            if (sa.dst, sa.spi) in self.sas:
                return XfrmExists(r.op, errno.EEXIST, r.what)
            self.sas[(sa.dst, sa.spi)] = replace(sa, add_time=now)
        elif r.type == k.XFRM_MSG_UPDSA:  # a valid SA takes the lifetime only (as Linux)
            sa = codec.decode_sa(memoryview(r.body), 0, len(r.body))
            have = self.sas.get((sa.dst, sa.spi))
            if have is None:
                return XfrmNotFound(r.op, errno.ESRCH, r.what)
            self.sas[(sa.dst, sa.spi)] = replace(have, hard=sa.hard)
        elif r.type == k.XFRM_MSG_NEWPOLICY:
            pol = codec.decode_policy(memoryview(r.body), 0, len(r.body))
            if (pol.dir, pol.sel) in self.policies_by_id:
                return XfrmExists(r.op, errno.EEXIST, r.what)
            self.policies_by_id[(pol.dir, pol.sel)] = replace(pol, index=next(self._index),
                                                              add_time=now)
        elif r.type == k.XFRM_MSG_UPDPOLICY:  # replaced, same index, added now (as Linux)
            pol = codec.decode_policy(memoryview(r.body), 0, len(r.body))
            have = self.policies_by_id.get((pol.dir, pol.sel))
            self.policies_by_id[(pol.dir, pol.sel)] = replace(
                pol, index=have.index if have is not None else next(self._index), add_time=now)
        elif r.type == k.XFRM_MSG_DELSA:
            if self.sas.pop((r.what.dst, r.what.spi), None) is None:
                return XfrmNotFound(r.op, errno.ESRCH, r.what)
        elif r.type == k.XFRM_MSG_DELPOLICY:
            key = self._policy_key(r.what)
            if key is None:
                return XfrmNotFound(r.op, errno.ENOENT, r.what)
            del self.policies_by_id[key]
        else:
            raise AssertionError(f"unexpected netlink request type {r.type}")
        return None

    def get_policies(self, ids) -> list:
        """As Xfrm.get_policies: the policy on each selector and direction, or not found."""
        out = []
        for pid in ids:
            err = self.refuse(codec.get_policy(pid))
            found = self.policies_by_id.get((pid.dir, pid.sel))
            out.append(xfrm_error("get", err, pid) if err else found if found is not None
                       else XfrmNotFound("get", errno.ENOENT, pid))
        return out

    def look_up(self, sa_ids, policy_ids) -> tuple[list, list]:
        """As Xfrm.look_up: get_states and get_policies together."""
        return self.get_states(sa_ids), self.get_policies(policy_ids)

    def get_states(self, ids) -> list:
        """As Xfrm.get_states: the SA of each (destination, SPI), or not found."""
        out = []
        for sid in ids:
            err = self.refuse(codec.get_sa(sid))
            found = self.sas.get((sid.dst, sid.spi))
            out.append(xfrm_error("get", err, sid) if err else found if found is not None
                       else XfrmNotFound("get", errno.ESRCH, sid))
        return out

    def _policy_key(self, pid) -> tuple[Dir, Selector] | None:
        if pid.sel is not None:
            key = (pid.dir, pid.sel)
            return key if key in self.policies_by_id else None
        return next((key for key, p in self.policies_by_id.items()
                     if p.index == pid.index and p.dir == pid.dir), None)

    def states(self, user: int | None = None) -> list[SAInfo]:
        return [s for s in self.sas.values() if user is None or s.sel.user == user]

    def policies(self, user: int | None = None) -> list[PolicyInfo]:
        return [p for p in self.policies_by_id.values() if user is None or p.sel.user == user]

    def flush(self, user: int) -> Flushed:
        pols = [key for key, p in self.policies_by_id.items() if p.sel.user == user]
        sas = [key for key, s in self.sas.items() if s.sel.user == user]
        for key in pols:
            del self.policies_by_id[key]
        for key in sas:
            del self.sas[key]
        return Flushed(states=len(sas), policies=len(pols))

    def flows(self) -> set[tuple[str, int, str, int, int]]:
        """(src, sport, dst, dport, spi) of every SA: what a tunnel test compares."""
        return {(s.sel.src, s.sel.sport, s.sel.dst, s.sel.dport, s.spi) for s in self.sas.values()}


class Clock:
    """The module's clock, moved by the test (the sweep and expiries read it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- SIP text ------------------------------------------------------------------------------

def register(*, aor: str = AOR, contact: str = f"sip:alice@{UE}:5060", via: str = f"{UE}:5060",
             proto: str = "UDP", security_client: str | None = OFFER,
             security_verify: str | None = None, expires: int = 600, cseq: int = 1,
             extra: tuple[str, ...] = ()) -> str:
    lines = [
        "REGISTER sip:ims.example SIP/2.0",
        f"Via: SIP/2.0/{proto} {via};branch=z9hG4bK-{cseq}",
        "Max-Forwards: 70",
        f"From: <{aor}>;tag=reg{cseq}",
        f"To: <{aor}>",
        "Call-ID: reg-call@ue",
        f"CSeq: {cseq} REGISTER",
        f"Contact: <{contact}>;expires={expires}",
        "Supported: path, sec-agree",
        "Require: sec-agree",
        "Proxy-Require: sec-agree",
    ]
    if security_client is not None:
        lines.append(f"Security-Client: {security_client}")
    if security_verify is not None:
        lines.append(f"Security-Verify: {security_verify}")
    lines += list(extra)
    return "\r\n".join(lines + ["Content-Length: 0", "", ""])


def request(method: str, ruri: str, *, via: str, to_tag: str | None = None,
            extra: tuple[str, ...] = ()) -> str:
    to = f"<{AOR}>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP {via};branch=z9hG4bK-{method.lower()}",
        "Max-Forwards: 70",
        "From: <sip:bob@ims.example>;tag=b1",
        f"To: {to}",
        f"Call-ID: {method.lower()}-call@test",
        f"CSeq: 1 {method}",
        "Contact: <sip:bob@10.0.0.50:5060>",
        *extra,
        "Content-Length: 0",
        "",
        "",
    ]
    return "\r\n".join(lines)


def reply_to(request_raw: str, code: int, reason: str, extra: tuple[str, ...] = ()) -> str:
    """A reply as the next hop builds it: Via, From, To (tagged), Call-ID, CSeq copied."""
    req = KSR.parse(request_raw)
    copied = [f"{name}: {body}" for name, body in req.headers
              if name.lower() in ("via", "from", "call-id", "cseq")]
    to = req.bodies("To")[0]
    lines = [f"SIP/2.0 {code} {reason}", *copied, f"To: {to};tag=scscf", *extra,
             "Content-Length: 0", "", ""]
    return "\r\n".join(lines)


def challenge(ck: str | None = CK, ik: str | None = IK) -> str:
    params = ['Digest realm="ims.example"', 'nonce="bm9uY2U="', "algorithm=AKAv1-MD5"]
    if ck is not None:
        params.append(f'ck="{ck}"')
    if ik is not None:
        params.append(f'ik="{ik}"')
    params.append('qop="auth"')
    return ", ".join(params)


# -- the P-CSCF ----------------------------------------------------------------------------

@dataclass
class Pcscf:
    """The module and the routing script over the KSR double, with one-call SIP steps."""

    module: Module
    routing: Routing
    kernel: FakeKernel
    clock: Clock

    @classmethod
    def start(cls, store_path: str, **define_overrides: str) -> "Pcscf":
        KSR._reset()
        KSR._defines(defines(store_path, **define_overrides))
        module = Module.from_defines(KSR.kx.get_def, log=KSR)
        kernel, clock = FakeKernel(), Clock()
        module.xfrm, module.clock = kernel, clock
        module.store.clock = clock  # leases are timed as the kernel's add_time is
        kernel.clock = clock
        KSR._listen(*listen_sockets(module.params))
        return cls(module, Routing(module, KSR.kx.get_def, DOMAIN), kernel, clock)

    def request(self, raw: str, source=(UE, 5060, "udp"), local=(PCSCF, 5060), **kw):
        """Run the request route; returns the double's record of what it did."""
        rec = KSR._load_request(raw, source, local, **kw)
        assert self.routing.request(KsrMessage()) == 1
        return rec

    def register_reply(self, relay: KSR.Relay, raw: str):
        rec = KSR._load_reply(raw, relay, source=(CORE, 5060, "udp"))
        assert self.routing.register_reply(KsrMessage()) == 1
        return rec

    def registered(self, *, offer: str = OFFER, ue: str = UE, port: int = 5060,
                   aor: str = AOR, proto: str = "udp", expires: int = 600,
                   contact: str | None = None, ok_extra: tuple[str, ...] = ()) -> str:
        """An initial registration through to its 200 OK (with `ok_extra` headers); returns
        the Security-Server sent."""
        contact = contact or f"sip:alice@{ue}:{port}"
        reg = register(aor=aor, contact=contact, via=f"{ue}:{port}",
                       proto=proto.upper(), security_client=offer, expires=expires)
        rec = self.request(reg, source=(ue, port, proto))
        assert rec.relays, rec.log_text()
        rec = self.register_reply(rec.relays[0], reply_to(reg, 401, "Unauthorized", (
            f"WWW-Authenticate: {challenge()}",)))
        assert rec.reply_status is None, rec.log_text()
        server = rec.values("Security-Server")[0]
        port_uc = int(server_param(offer, "port-c"))
        port_ps = int(server_param(server, "port-s"))
        protected = register(aor=aor, contact=contact, via=f"{ue}:{port_uc}",
                             proto=proto.upper(), security_client=offer,
                             security_verify=server, expires=expires, cseq=2)
        rec = self.request(protected, source=(ue, port_uc, proto), local=(PCSCF, port_ps))
        assert rec.relays, rec.log_text()
        rec = self.register_reply(rec.relays[0], reply_to(protected, 200, "OK", (
            f"Contact: <{contact}>;expires={expires}", *ok_extra)))
        return server

    def refreshed(self, server: str, cseq: int, expires: int = 600, ue: str = UE,
                  port_uc: int = PORT_UC):
        """A re-registration through the SAs in use (`server` is their Security-Server) that
        the core accepts without a challenge; returns the record of its 200 OK."""
        reg = register(contact=f"sip:alice@{ue}:5060", via=f"{ue}:{port_uc}",
                       security_verify=server, cseq=cseq, expires=expires)
        rec = self.request(reg, source=(ue, port_uc, "udp"),
                           local=(PCSCF, int(server_param(server, "port-s"))))
        assert rec.relays, rec.log_text()
        return self.register_reply(rec.relays[0], reply_to(reg, 200, "OK", (
            f"Contact: <sip:alice@{ue}:5060>;expires={expires}",)))


def server_param(value: str, name: str) -> str:
    for part in value.split(";"):
        key, _, val = part.partition("=")
        if key.strip() == name:
            return val.strip()
    raise KeyError(name)
