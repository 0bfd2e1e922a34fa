"""The few SIP URI facts the tunnel look-ups need: where a URI points (host, port, transport).

A request to a phone carries the phone's contact URI (R-URI, destination URI or new R-URI); a
phone behind NAT is reached at the address Kamailio recorded in the `alias=ip~port~proto`
parameter instead of the host part. Pure functions over strings, no SIP stack.
"""
from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

# Kamailio's numbering of transports in the alias parameter (PROTO_UDP .. PROTO_SCTP).
ALIAS_PROTOS = {1: "udp", 2: "tcp", 3: "tls", 4: "sctp"}
TRANSPORTS = frozenset(ALIAS_PROTOS.values())


class SipUriError(ValueError):
    """A URI we cannot read: the sender's fault, never ours."""


@dataclass(frozen=True)
class Address:
    """A transport address as the store compares it: normalised host, port, transport."""

    host: str
    port: int
    proto: str = "udp"

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", normalize_host(self.host))
        object.__setattr__(self, "proto", self.proto.lower())
        if not 0 < self.port < 65536:
            raise SipUriError(f"port out of range: {self.port}")


@dataclass(frozen=True)
class SipUri:
    scheme: str
    user: str
    host: str
    port: int | None
    params: dict[str, str]


@functools.lru_cache(maxsize=4096)
def normalize_host(host: str) -> str:
    """One spelling per address, so `[2001:DB8::1]` and `2001:db8:0::1` compare equal.

    Cached: every record the store hands out normalises its hosts, and parsing an address
    with `ipaddress` was a third of a registration's Python time inside Kamailio."""
    bare = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(bare).compressed
    except ValueError:
        return bare.lower()


def hostport(host: str, port: int) -> str:
    """host:port as a URI or a Kamailio socket writes it: IPv6 in brackets."""
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def parse_uri(text: str) -> SipUri:
    """Split a sip:/sips: URI; accepts a `<...>`-enclosed header value, ignores `?headers`."""
    s = text.strip()
    if "<" in s:
        s = s[s.index("<") + 1 : s.rindex(">") if ">" in s else len(s)]
    scheme, sep, rest = s.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("sip", "sips"):
        raise SipUriError(f"not a SIP URI: {text!r}")
    rest = rest.split("?", 1)[0]
    # the user part may hold ';' (RFC 3261 user-unreserved: `sip:+123;npdi@host`), never '@'
    user, at, rest = rest.partition("@")
    if not at:
        user, rest = "", user
    hostport, *raw_params = rest.split(";")
    if "@" in hostport:
        raise SipUriError(f"more than one '@' in {text!r}")
    host, port = _split_hostport(hostport)
    return SipUri(scheme, user, host, port, _params(raw_params))


def _split_hostport(hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise SipUriError(f"unclosed IPv6 reference: {hostport!r}")
        host, tail = hostport[: end + 1], hostport[end + 1 :]
        port_text = tail[1:] if tail.startswith(":") else None
        if tail and port_text is None:
            raise SipUriError(f"bad host:port: {hostport!r}")
    else:
        host, _, port_text = hostport.partition(":")
        port_text = port_text or None
    if not host.strip("[]"):
        raise SipUriError(f"no host in {hostport!r}")
    return normalize_host(host), _port(port_text) if port_text is not None else None


def is_digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' and Arabic-Indic digits, which int()
    then reads as a number (or refuses with an error no caller expects)."""
    return text.isascii() and text.isdigit()


def _port(text: str) -> int:
    if not is_digits(text) or not 0 < int(text) < 65536:
        raise SipUriError(f"bad port: {text!r}")
    return int(text)


def _params(raw: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in raw:
        name, _, value = item.partition("=")
        if name.strip():
            out[name.strip().lower()] = value.strip()
    return out


def uri_target(uri: SipUri) -> Address:
    """Where the URI itself points (RFC 3263 defaults without DNS: 5060, or 5061 for TLS)."""
    proto = uri.params.get("transport", "tls" if uri.scheme == "sips" else "udp").lower()
    if proto not in TRANSPORTS:
        raise SipUriError(f"unknown transport: {proto!r}")
    default = 5061 if proto == "tls" else 5060
    return Address(uri.host, uri.port or default, proto)


def alias_target(uri: SipUri) -> Address | None:
    """The phone's NATed address Kamailio wrote as `alias=ip~port~proto`, if present."""
    value = uri.params.get("alias")
    if value is None:
        return None
    parts = value.split("~")
    if len(parts) != 3 or not is_digits(parts[2]) or int(parts[2]) not in ALIAS_PROTOS:
        raise SipUriError(f"bad alias parameter: {value!r}")
    return Address(parts[0], _port(parts[1]), ALIAS_PROTOS[int(parts[2])])
