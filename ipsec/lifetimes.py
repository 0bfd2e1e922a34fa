"""Kernel hard lifetimes: a safety net under the store, so that nothing of ours outlives its
phone in the kernel even if the module forgets a tunnel (a bug, a store lost or restored from
an old copy).

Each SA and policy gets a hard lifetime a margin past the moment the sweep would remove it:

- at the 401 (the tunnel is pending): PENDING_LIFETIME + margin after it was added (the
  sweep drops a pending tunnel PENDING_LIFETIME after its lease);
- at each 200 OK that registers or refreshes its contact: the registration's expiry +
  EXPIRY_GRACE + margin (the sweep removes it at expiry + EXPIRY_GRACE).

The kernel counts a hard lifetime from the entry's add_time, and an update keeps an SA's
add_time (XFRM_MSG_UPDSA copies only the new lifetime into the existing SA) while a replaced
policy is added anew (XFRM_MSG_UPDPOLICY): `seconds` turns a deadline into the value to give
for an entry added at `added`. Pure: the kernel side is ipsec/tunnel.py `renew`.
"""
from __future__ import annotations

import math

from .params import ParamError

# How long past the sweep's own deadline the kernel waits: the sweep runs every second, so
# this only has to cover a sweep delayed by a busy or restarting Kamailio.
MARGIN = 60.0


def margin_from(raw: str) -> float:
    """LIFETIME_MARGIN from kamailio.cfg (whole seconds, 1..86400; empty: MARGIN)."""
    if not raw:
        return MARGIN
    try:
        value = int(raw)
    except ValueError:
        raise ParamError(f"LIFETIME_MARGIN: {raw!r} is not an integer") from None
    if not 1 <= value <= 86400:
        raise ParamError(f"LIFETIME_MARGIN: {value} is out of range 1..86400")
    return float(value)


def pending_seconds(pending_lifetime: float, margin: float = MARGIN) -> int:
    """The hard lifetime of a tunnel installed for a 401 (it is pending)."""
    return max(1, math.ceil(pending_lifetime + margin))


def registered_deadline(expires: float, grace: float, margin: float = MARGIN) -> float:
    """When the kernel may drop a registered contact's tunnel (epoch seconds): `margin`
    after the sweep would have removed it (expiry + grace)."""
    return expires + grace + margin


def seconds(deadline: float, added: float, now: float) -> int:
    """The hard lifetime (seconds after `added`, the entry's add_time) that ends at
    `deadline`; never earlier than a second from `now` (a deadline already past: the
    sweep removes the tunnel, the kernel follows a second later at most)."""
    return max(1, math.ceil(max(deadline, now + 1) - added))
