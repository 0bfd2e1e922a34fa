"""What the store hands out: plain frozen records, the errors, and the tunnel-reuse decision."""
from __future__ import annotations

import hmac
from dataclasses import dataclass

from ipsec.sipuri import Address, normalize_host

PENDING = "pending"
REGISTERED = "registered"


class StoreError(Exception):
    """The shared state could not do what was asked: a P-CSCF (our) failure, never the phone's."""


class SpiExhausted(StoreError):
    """Every SPI pair of the configured range is leased: no tunnel can be built until one frees."""


class NotLeased(StoreError):
    """A tunnel was attached with SPIs that are not (or no longer) leased."""


class PhoneSpiInUse(StoreError):
    """Another tunnel to the same phone address uses one of these phone SPIs."""


class UnknownContact(StoreError):
    """The contact id does not exist (deleted by a sweep or another worker)."""


class SchemaMismatch(StoreError):
    """The file was written by another schema version: refuse rather than corrupt it."""


@dataclass(frozen=True)
class Lease:
    """Our side of one tunnel: the SPIs we receive on and the protected ports we use."""

    spi_pc: int
    spi_ps: int
    port_pc: int
    port_ps: int


@dataclass(frozen=True)
class UeSide:
    """The phone's side of one tunnel, from its Security-Client: address, SPIs, ports."""

    host: str
    spi_uc: int
    spi_us: int
    port_uc: int
    port_us: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", normalize_host(self.host))


@dataclass(frozen=True)
class Tunnel:
    """One SA set as installed: both sides, the algorithms, and what later checks compare.

    `keys_digest` is the store's keyed digest of CK||IK (`Store.keys_digest`), never the keys;
    `security_server` is the header we sent, which every later Security-Verify must equal;
    `txn` identifies the REGISTER transaction whose 401 offered it.
    """

    lease: Lease
    ue: UeSide
    alg: str
    ealg: str
    pcscf_host: str
    keys_digest: bytes
    offer: str
    security_server: str
    txn: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "pcscf_host", normalize_host(self.pcscf_host))

    def __repr__(self) -> str:  # the digest is not secret, but it is noise in every log line
        return (f"Tunnel(lease={self.lease!r}, ue={self.ue!r}, alg={self.alg!r}, "
                f"ealg={self.ealg!r}, pcscf_host={self.pcscf_host!r})")


@dataclass(frozen=True)
class Binding:
    """What an unprotected REGISTER says of its contact: the AoR (To), the Contact URI, its
    top Via and where it came from. (aor, received) identifies the contact."""

    aor: str
    uri: str
    via: Address
    received: Address


@dataclass(frozen=True)
class Contact:
    """A phone's registration as ims_usrloc_pcscf would hold it for this module.

    `received` is where its REGISTER came from before protection (the contact's identity with
    `aor`); `tunnel` is the SA set in use, `pending` the one its last 401 offered and that no
    REGISTER has come through yet (promoted by its 200 OK).
    `expires` is absolute (epoch seconds): the registration's end, or the end of the pending
    lifetime while `state` is "pending". `uri` and `transport` are the binding requests to the
    phone follow: its last REGISTER's Contact, and the transport it asks for (or used).
    `associated` and `service_route` are the URIs of the P-Associated-URI and Service-Route
    of its last 200 OK to REGISTER (empty before one).
    """

    id: int
    aor: str
    uri: str
    via: Address
    received: Address
    state: str
    expires: float
    tunnel: Tunnel | None
    pending: Tunnel | None = None
    transport: str = "udp"
    associated: tuple[str, ...] = ()
    service_route: tuple[str, ...] = ()


# What a 401 does to a phone's tunnels (ipsec/challenge.py decides, Store.challenge acts)
KEEP = "keep"  # the tunnel already offered serves this challenge: its Security-Server again
NEW = "new"  # lease, stage and install a new tunnel
CLEAR = "clear"  # remove this unconfirmed tunnel (its phone SPIs are offered again), decide again
REFUSE = "refuse"  # this challenge gets no tunnel: the 401 becomes a 503, its keys never leave


@dataclass(frozen=True)
class Decision:
    action: str
    tunnel: Tunnel | None = None
    reason: str = ""


def keep_tunnel(current: Tunnel | None, ue: UeSide, keys_digest: bytes,
                reuse_server_port: bool) -> bool:
    """Re-registration: may the phone keep its current SA set instead of a new lease?

    Only with `ipsec_reuse_server_port` = 1, and only when the SAs would be identical: same
    CK/IK (the C module once reused tunnels after a key change) and the same phone SPIs and
    ports (the phone's new Security-Client names the SAs it will use).
    """
    return (reuse_server_port and current is not None and current.ue == ue
            and hmac.compare_digest(current.keys_digest, keys_digest))
