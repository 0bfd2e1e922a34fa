"""The module parameters: the C module's names and defaults, read once at start.

Operators know these names from `modparam("ims_ipsec_pcscf", ...)`; in kamailio.cfg they are
upper-case defines (`IPSEC_CLIENT_PORT`, ...) that the KEMI script reads with `KSR.kx.get_def`.
A bad value must stop Kamailio at start with a message naming the parameter and the value,
so validation raises `ParamError` and the caller refuses to start.
"""
from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, fields
from typing import Callable

from .algorithms import AUTH_ALGS, ENC_ALGS

SPI_MAX = 2**32 - 1
# Port pairs: each binds UDP and TCP on 2 ports per address family, and every UDP socket has
# Kamailio worker processes of its own; pairs are shared by all phones, so a few suffice.
MAX_CONNECTIONS = 100
RESERVED_SPIS = range(1, 256)  # RFC 4303 section 2.1


class ParamError(ValueError):
    """A parameter value Kamailio must not start with."""


@dataclass(frozen=True)
class Params:
    ipsec_listen_addr: str = ""
    ipsec_listen_addr6: str = ""
    ipsec_client_port: int = 5062
    ipsec_server_port: int = 5063
    ipsec_max_connections: int = 2
    ipsec_reuse_server_port: int = 1
    ipsec_spi_id_start: int = 100
    ipsec_spi_id_range: int = 1000
    ipsec_preferred_alg: str = ""
    ipsec_preferred_ealg: str = ""
    ipsec_listen_name: str = ""
    ipsec_listen_agname: str = ""
    ipsec_store: str = ""

    def __post_init__(self) -> None:
        _check_addr("ipsec_listen_addr", self.ipsec_listen_addr, 4)
        _check_addr("ipsec_listen_addr6", self.ipsec_listen_addr6, 6)
        if not (self.ipsec_listen_addr or self.ipsec_listen_addr6):
            raise ParamError("ipsec_listen_addr and ipsec_listen_addr6 are both empty: no protected socket")
        _check_connections(self.ipsec_max_connections, families=(bool(self.ipsec_listen_addr)
                                                                 + bool(self.ipsec_listen_addr6)))
        top = 65536 - self.ipsec_max_connections
        _check_range("ipsec_client_port", self.ipsec_client_port, 1, top)
        _check_range("ipsec_server_port", self.ipsec_server_port, 1, top)
        _check_range("ipsec_reuse_server_port", self.ipsec_reuse_server_port, 0, 1)
        _check_range("ipsec_spi_id_start", self.ipsec_spi_id_start, 1, SPI_MAX)
        # Each lease takes two SPIs (spi_pc, spi_ps) from the range.
        _check_range("ipsec_spi_id_range", self.ipsec_spi_id_range, 2, SPI_MAX - self.ipsec_spi_id_start + 1)
        if self.ipsec_preferred_alg and self.ipsec_preferred_alg not in AUTH_ALGS:
            raise ParamError(f"ipsec_preferred_alg: unknown algorithm {self.ipsec_preferred_alg!r} (one of {', '.join(AUTH_ALGS)})")
        if self.ipsec_preferred_ealg and self.ipsec_preferred_ealg not in ENC_ALGS:
            raise ParamError(f"ipsec_preferred_ealg: unknown algorithm {self.ipsec_preferred_ealg!r} (one of {', '.join(ENC_ALGS)})")

    @property
    def client_ports(self) -> range:
        return range(self.ipsec_client_port, self.ipsec_client_port + self.ipsec_max_connections)

    @property
    def server_ports(self) -> range:
        return range(self.ipsec_server_port, self.ipsec_server_port + self.ipsec_max_connections)

    @functools.cached_property
    def protected_ports(self) -> frozenset[int]:
        """Asked of every request (did it arrive protected?): computed once."""
        return frozenset(self.client_ports) | frozenset(self.server_ports)

    @functools.cached_property
    def protected_addrs(self) -> frozenset[str]:
        """In the spelling Address uses, so `local.host in protected_addrs` holds for IPv6."""
        return frozenset(ipaddress.ip_address(a.strip("[]")).compressed
                         for a in (self.ipsec_listen_addr, self.ipsec_listen_addr6) if a)

    def warnings(self) -> list[str]:
        """Values Kamailio may start with but an operator should hear about."""
        out = []
        spis = range(self.ipsec_spi_id_start, self.ipsec_spi_id_start + self.ipsec_spi_id_range)
        if spis.start <= RESERVED_SPIS.stop - 1 and RESERVED_SPIS.start <= spis.stop - 1:
            out.append(
                f"ipsec_spi_id_start={self.ipsec_spi_id_start} ipsec_spi_id_range={self.ipsec_spi_id_range}: "
                "the SPI range overlaps 1-255, reserved by RFC 4303 (some peers refuse them); "
                "set IPSEC_SPI_ID_START to 256 or more"
            )
        if self.ipsec_max_connections < 2:
            out.append("ipsec_max_connections=1: a phone that keeps its server port when it "
                       "re-keys (33.203 7.4) gets SAs identical in selectors to its old ones, "
                       "which the kernel refuses; use 2 or more")
        overlap = frozenset(self.client_ports) & frozenset(self.server_ports)
        if overlap:
            out.append(f"client and server port ranges share port(s) {sorted(overlap)}")
        return out

    @classmethod
    def from_defines(cls, get_def: Callable[[str], str]) -> "Params":
        """Read every parameter from the kamailio.cfg define of its upper-case name.

        `get_def` is `KSR.kx.get_def`: it returns the define's raw text ("" when undefined),
        string values with the quotes written in the cfg.
        """
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = _unquote((get_def(f.name.upper()) or "").strip())
            if raw == "":
                continue
            if f.type == "int":
                try:
                    values[f.name] = int(raw, 0)
                except ValueError:
                    raise ParamError(f"{f.name}: {raw!r} is not an integer") from None
            else:
                values[f.name] = raw
        return cls(**values)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or not low <= value <= high:
        raise ParamError(f"{name}: {value!r} is out of range {low}..{high}")


def _check_connections(pairs: int, families: int) -> None:
    _check_range("ipsec_max_connections", pairs, 1, 65535)
    if pairs > MAX_CONNECTIONS:
        raise ParamError(
            f"ipsec_max_connections: {pairs} port pairs is more than {MAX_CONNECTIONS}; it is not "
            f"the number of phones: all phones share the port pairs (a phone uses one pair and "
            f"moves to another when it re-keys), so a few suffice (2 to 10). Each pair is 2 "
            f"protected UDP sockets per address family, each with worker processes of its own: "
            f"{pairs} pairs would start {2 * pairs * families} processes or more. Use fewer pairs; "
            f"for more protected workers raise IPSEC_CHILDREN (workers per protected socket)")


def _check_addr(name: str, value: str, version: int) -> None:
    if not value:
        return
    try:
        addr = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise ParamError(f"{name}: {value!r} is not an IP address") from None
    if addr.version != version:
        raise ParamError(f"{name}: {value!r} is not an IPv{version} address")
