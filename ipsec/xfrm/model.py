"""Plain values for XFRM: what we ask the kernel to install, and what its dumps report.

Keys travel only inside `SA.algs` (`ipsec.algorithms.EspAlgs`, whose repr hides them); records
read back from the kernel never carry keys, only algorithm names.
"""
from __future__ import annotations

import enum
import socket
from dataclasses import dataclass

from ipsec.algorithms import EspAlgs

from .structs import IPPROTO_ESP, XFRM_MODE_TRANSPORT


class Dir(enum.IntEnum):
    """Policy direction, numbered as the kernel's XFRM_POLICY_IN/OUT/FWD."""

    IN = 0
    OUT = 1
    FWD = 2


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _endpoint(addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr else addr
    return f"{host}:{port}" if port else host


@dataclass(frozen=True, slots=True)
class Selector:
    """Which packets an SA or policy covers. Port 0 means any port; proto 0 means any protocol.

    `user` is the owner marker: the kernel stores it untouched, so it tells our entries from
    everyone else's. Prefix lengths of None mean the whole address (one host).
    """

    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    proto: int = 0
    user: int = 0
    prefixlen_s: int | None = None
    prefixlen_d: int | None = None

    @property
    def family(self) -> int:
        return family_of(self.src)

    def __str__(self) -> str:
        proto = "any" if self.proto == 0 else str(self.proto)
        return f"{_endpoint(self.src, self.sport)} -> {_endpoint(self.dst, self.dport)} proto {proto}"


@dataclass(frozen=True, slots=True)
class Lifetime:
    """Kernel expiry of an SA, in seconds after it was added (0: none). Soft warns, hard deletes."""

    soft: int = 0
    hard: int = 0


@dataclass(frozen=True, slots=True)
class SA:
    """An ESP transport-mode SA to add: identity (dst, spi), endpoints, selector, algorithms."""

    src: str
    dst: str
    spi: int
    sel: Selector
    algs: EspAlgs
    reqid: int = 0
    replay_window: int = 32
    lifetime: Lifetime | None = None

    @property
    def family(self) -> int:
        return family_of(self.dst)

    def __str__(self) -> str:
        return f"SA esp spi 0x{self.spi:08x} {self.src} -> {self.dst} sel {self.sel}"


@dataclass(frozen=True, slots=True)
class SAId:
    """How the kernel finds an SA: destination address, SPI and protocol."""

    dst: str
    spi: int
    proto: int = IPPROTO_ESP

    def __str__(self) -> str:
        return f"SA esp spi 0x{self.spi:08x} dst {self.dst}"


@dataclass(frozen=True, slots=True)
class Template:
    """The SA a policy requires: transport-mode ESP between src and dst with this reqid."""

    src: str
    dst: str
    reqid: int
    spi: int = 0
    proto: int = IPPROTO_ESP
    mode: int = XFRM_MODE_TRANSPORT


@dataclass(frozen=True, slots=True)
class Policy:
    """A policy to add: packets matching `sel` in direction `dir` must use `tmpl`'s SA."""

    sel: Selector
    dir: Dir
    tmpl: Template
    priority: int = 0
    lifetime: Lifetime | None = None

    def __str__(self) -> str:
        return f"policy {self.dir.name.lower()} {self.sel}"


@dataclass(frozen=True, slots=True)
class PolicyId:
    """How the kernel finds a policy: selector and direction, or its index."""

    dir: Dir
    sel: Selector | None = None
    index: int = 0

    def __str__(self) -> str:
        where = str(self.sel) if self.sel is not None else f"index {self.index}"
        return f"policy {self.dir.name.lower()} {where}"


@dataclass(frozen=True, slots=True)
class SAInfo:
    """One SA as the kernel reports it (algorithm names only, never keys)."""

    src: str
    dst: str
    spi: int
    proto: int
    mode: int
    reqid: int
    replay_window: int
    sel: Selector
    auth: str | None
    crypt: str | None
    aead: str | None
    bytes: int
    packets: int
    add_time: int
    use_time: int
    last_used: int | None
    replay: int
    integrity_failed: int
    hard: int = 0  # hard lifetime, seconds after add_time (0: none)

    @property
    def id(self) -> SAId:
        return SAId(self.dst, self.spi, self.proto)


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One policy as the kernel reports it."""

    sel: Selector
    dir: Dir
    priority: int
    index: int
    action: int
    templates: tuple[Template, ...]
    add_time: int
    use_time: int
    hard: int = 0  # hard lifetime, seconds after add_time (0: none)

    @property
    def id(self) -> PolicyId:
        return PolicyId(self.dir, index=self.index)
