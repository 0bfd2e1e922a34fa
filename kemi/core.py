"""Where the core (I-/S-CSCF) is, and what the P-CSCF trusts as coming from it.

Two shapes, chosen by the defines:

- **Core socket** (`CORE_IP`, optional `CORE_PORT`, default 5060): kamailio.cfg listens there
  for the core alone. A request is from the core when it arrived on that socket, whatever its
  source address; requests to the core leave from it, so the Path and Record-Route the core
  sees name it. Port 5060 of `PCSCF_IP` then serves phones only: a request there from the
  core's address (UDP is easily spoofed) is a phone's and is refused unless it is a REGISTER.
- **One socket** (no `CORE_IP`; what common P-CSCF configurations do): a request on 5060
  whose source address is one of NEXT_HOP's is from the core. NEXT_HOP's host is resolved
  once at start (an FQDN works); what this trusts is logged once at start.

In-dialog requests from a phone may only go to the core (NEXT_HOP's host and addresses, or
the S-CSCF of the phone's registration, from its Service-Route) or to ourselves.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable

import KSR

from ipsec.sipuri import SipUriError, hostport, normalize_host, parse_uri, uri_target

SIP_PORT = 5060  # kamailio.cfg's port for phones on PCSCF_IP(6)


class CoreError(Exception):
    """The core cannot be told apart with these defines: Kamailio must not start."""


def _unquote(value: str | None) -> str:
    return (value or "").strip().strip('"').strip()


def resolve(host: str) -> frozenset[str]:
    """Every address of `host` (an address literal gives itself)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP)
    return frozenset(normalize_host(info[4][0]) for info in infos)


@dataclass(frozen=True)
class Core:
    next_hop: str  # the URI REGISTERs and initial requests from phones go to
    next_hop_hosts: frozenset[str]  # its host as written and every address it resolved to
    socket_host: str | None  # the core socket (None: one socket for phones and core)
    socket_port: int
    pcscf_ip: str

    @classmethod
    def from_defines(cls, get_def: Callable[[str], str | None],
                     resolver: Callable[[str], frozenset[str]] = resolve) -> "Core":
        pcscf_ip = _unquote(get_def("PCSCF_IP")) or "127.0.0.1"
        next_hop = _unquote(get_def("NEXT_HOP"))
        try:
            host = parse_uri(next_hop).host
        except SipUriError as e:
            raise CoreError(f"NEXT_HOP {next_hop!r}: {e}") from None
        core_ip = _unquote(get_def("CORE_IP")) or None
        port_text = _unquote(get_def("CORE_PORT")) or str(SIP_PORT)
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise CoreError(f"CORE_PORT {port_text!r} is not a port")
        port = int(port_text)
        if core_ip is not None and (normalize_host(core_ip), port) == (normalize_host(pcscf_ip),
                                                                       SIP_PORT):
            raise CoreError(f"CORE_IP:CORE_PORT {hostport(core_ip, port)} is the phones' socket "
                            f"(PCSCF_IP:{SIP_PORT}): give the core its own address or port")
        try:
            hosts = frozenset({host}) | resolver(host)
        except OSError as e:
            if core_ip is None:
                raise CoreError(
                    f"NEXT_HOP host {host!r} does not resolve ({e}): with one socket the core "
                    f"is told apart by its address; fix DNS or set CORE_IP") from None
            hosts = frozenset({host})
        return cls(next_hop, hosts, normalize_host(core_ip) if core_ip else None, port, pcscf_ip)

    def trust_line(self) -> str:
        """What the P-CSCF trusts as the core: logged once at start."""
        if self.socket_host is not None:
            return (f"core socket {hostport(self.socket_host, self.socket_port)}: requests on "
                    f"it are the core's, requests to the core ({self.next_hop}) leave from it; "
                    f"port {SIP_PORT} serves phones only")
        return (f"one socket: a request to {hostport(self.pcscf_ip, SIP_PORT)} from "
                f"{', '.join(sorted(self.next_hop_hosts))} (NEXT_HOP {self.next_hop}) is "
                f"trusted as the core's, from any port; UDP sources can be spoofed: set "
                f"CORE_IP (and CORE_PORT) to give the core a socket of its own")

    @property
    def rr(self) -> str:
        """Our Record-Route entry facing the core (record_route_preset form; r2=on: double
        Record-Route, loose_route consumes both of our entries)."""
        host = self.socket_host or self.pcscf_ip
        port = self.socket_port if self.socket_host else SIP_PORT
        return f"{hostport(host, port)};r2=on"

    def on_core_socket(self, msg) -> bool:
        if self.socket_host is None:
            return False
        local = msg.local()
        return (local.host, local.port) == (self.socket_host, self.socket_port)

    def from_core(self, msg) -> bool:
        """Did this (unprotected) request come from the core? See the module docstring."""
        if self.socket_host is not None:
            return self.on_core_socket(msg)
        return msg.source().host in self.next_hop_hosts

    def send_to_core(self, uri: str | None = None) -> None:
        """The request leaves from the core socket (when there is one), with the transport
        of `uri` (default NEXT_HOP's)."""
        if self.socket_host is None:
            return
        try:
            proto = uri_target(parse_uri(uri or self.next_hop)).proto
        except SipUriError:
            proto = "udp"
        KSR.corex.set_send_socket(f"{proto}:{hostport(self.socket_host, self.socket_port)}")

    def may_route_to(self, uri: str, service_route: tuple[str, ...]) -> bool:
        """May an in-dialog request from a phone go to `uri`? Only to the core (NEXT_HOP's
        host or addresses, the hosts of the registration's Service-Route) or to ourselves."""
        try:
            host = parse_uri(uri).host
        except SipUriError:
            return False
        return self.is_core_host(host, service_route) or KSR.is_myself(uri) > 0

    def is_core_host(self, host: str, service_route: tuple[str, ...]) -> bool:
        """Is `host` (normalized) NEXT_HOP's host or one of its addresses, or the host of one
        of the registration's Service-Route URIs?"""
        if host in self.next_hop_hosts:
            return True
        for route in service_route:
            try:
                if parse_uri(route).host == host:
                    return True
            except SipUriError:
                continue
        return False


def next_hop_of(msg) -> str:
    """Where a request goes after loose_route: its destination URI, else its R-URI."""
    return msg.dst_uri() or msg.ruri()

