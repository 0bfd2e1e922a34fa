"""The counters the module keeps for an operator: one small interface, no I/O here.

`ipsec.module.Module` calls `count` on events and `gauge` from the sweep; kemi/stats.py
implements both over Kamailio's statistics (the statistics module, shared by every worker),
where `kamcmd stats.get_statistics all` reads them and xhttp_prom exports them to Prometheus
as `kamailio_script_<name>` (the statistics module puts every variable it declares in the group
`script`). The names below are declared in kamailio.cfg, one `modparam("statistics",
"variable", ...)` each (a unit test keeps the two lists equal). Tests use `Tally`.
"""
from __future__ import annotations

from typing import Protocol

# Counters: events since Kamailio started.
TUNNELS_CREATED = "ipsec_tunnels_created"  # new SAs installed at a 401
TUNNELS_KEPT = "ipsec_tunnels_kept"  # re-registration kept the SAs in use
TUNNELS_REKEYED = "ipsec_tunnels_rekeyed"  # a phone moved to new SAs, its old ones went
REMOVED = "ipsec_tunnels_removed_"  # + cause
DEREGISTRATION, EXPIRY, STARTUP = "dereg", "expiry", "startup"
# a challenged phone never came back through its SAs (PENDING_LIFETIME), or a flood limit
# took its pair; `ims-ipsec drop`/`flush` (outside Kamailio: noted in the store, counted by
# the next sweep)
UNCONFIRMED, OPERATOR = "unconfirmed", "operator"
CREATE_FAILED = "ipsec_create_failed_"  # + cause
PHONE, CORE, REFUSED, POOL, KERNEL, STORE, INTERNAL = (
    "phone", "core", "refused", "pool", "kernel", "store", "internal")
VERIFY_REFUSED = "ipsec_security_verify_refused"
REPLIES = "ipsec_replies_"  # + status: the P-CSCF's own refusals
REPLY_CODES = (421, 403, 503)
# replies the reply route kept from going on (kemi/replies.py): a stray one it may not forward,
# one carrying keys for no transaction, one of a transaction from the wrong sender
REPLIES_DROPPED = "ipsec_replies_dropped"
# unprotected REGISTERs shed while Kamailio was overloaded: dropped, or answered 503
# (kemi/overload.py)
REGISTERS_SHED = "ipsec_registers_shed"
# Gauges: set by the sweep from the store, every second.
LEASES_USED = "ipsec_leases_used"  # SPI pairs leased
LEASES_FREE = "ipsec_leases_free"  # SPI pairs left
TUNNELS_ACTIVE = "ipsec_tunnels_active"  # tunnels a contact uses (in use or pending)

COUNTERS = (TUNNELS_CREATED, TUNNELS_KEPT, TUNNELS_REKEYED,
            *(REMOVED + c for c in (DEREGISTRATION, EXPIRY, STARTUP, UNCONFIRMED, OPERATOR)),
            *(CREATE_FAILED + c for c in (PHONE, CORE, REFUSED, POOL, KERNEL, STORE, INTERNAL)),
            VERIFY_REFUSED, *(f"{REPLIES}{code}" for code in REPLY_CODES), REPLIES_DROPPED,
            REGISTERS_SHED)
GAUGES = (LEASES_USED, LEASES_FREE, TUNNELS_ACTIVE)


class Counters(Protocol):
    def count(self, name: str, n: int = 1) -> None: ...
    def gauge(self, name: str, value: int) -> None: ...


class NoCounters:
    """The default: nothing is counted (a Module built outside Kamailio)."""

    def count(self, name: str, n: int = 1) -> None:
        pass

    def gauge(self, name: str, value: int) -> None:
        pass


class Tally:
    """Counters in a dict (tests, and anything that wants to look at them in-process)."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name}")
        self.values[name] = self.values.get(name, 0) + n

    def gauge(self, name: str, value: int) -> None:
        if name not in GAUGES:
            raise KeyError(f"unknown gauge {name}")
        self.values[name] = value

    def __getitem__(self, name: str) -> int:
        return self.values.get(name, 0)
