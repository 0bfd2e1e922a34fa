"""Limits that keep legitimate phones served while anyone floods us with REGISTERs.

Anyone can send an unprotected REGISTER, and each one the core challenges costs an SPI pair
and 4 SAs + 4 policies until its phone comes back through them, or never does. Unbounded,
two such REGISTERs a second kept a 1,000-SPI range empty: new phones got 503, and registered
phones' re-keys failed, so they dropped off at expiry. So a challenge that needs a new tunnel
is weighed here first (`weigh`, pure: the store gathers the `Pressure` inside the challenge's
transaction, the module acts on the `Verdict`):

- An *unconfirmed* contact is one whose phone has never come back through any SAs: an
  unprotected REGISTER challenged, nothing since. At most `per_host` of them per phone
  address and `per_aor` per AoR; beyond that the OLDEST goes, not the newest: a phone that
  retries (new ports, new SPIs) always holds its latest challenge, and a flood from one
  address or for one AoR only churns its own share.
- `reserve` SPI pairs are kept for challenges that came through a phone's SAs (re-keys): an
  unprotected REGISTER never takes them; when only they are left, the oldest unconfirmed
  contact anywhere gives its pair up instead. A re-key that finds no pair free does the same.
  So a flood shortens how long an unconfirmed tunnel waits for its phone, never whether a
  registered phone can re-key.
- A re-key evicts the unconfirmed contacts whose tunnels use the phone ports it offers on
  its address: the phone proved those ports its own through its SAs, while an unconfirmed
  tunnel on them (a spoofed REGISTER offering them) would make its new SAs clash in the
  kernel and the re-key fail.
- Unconfirmed tunnels, and pending ones of registered contacts, live `pending_lifetime`
  seconds (the sweep removes them), not the 240 s the C module's temporary SAs had.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .params import ParamError

# (define, field, default, lowest, highest)
_DEFINES = (
    ("PENDING_PER_HOST", "per_host", 8, 1, 100_000),
    ("PENDING_PER_AOR", "per_aor", 4, 1, 100_000),
    ("REKEY_RESERVE", "reserve_percent", 10, 0, 90),
    ("PENDING_LIFETIME", "pending_lifetime", 30, 5, 3600),
)


def int_define(get_def: Callable[[str], str | None], name: str, default: int, low: int,
               high: int) -> int:
    """An integer define of kamailio.cfg (`default` when not defined); a bad one raises
    ParamError naming it."""
    raw = (get_def(name) or "").strip().strip('"')
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ParamError(f"{name}: {raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ParamError(f"{name}: {value} is out of range {low}..{high}")
    return value


@dataclass(frozen=True)
class Limits:
    per_host: int = 8
    per_aor: int = 4
    reserve: int = 0  # SPI pairs only challenges through a phone's SAs may take
    pending_lifetime: float = 30.0

    @classmethod
    def from_defines(cls, get_def: Callable[[str], str], spi_pairs: int) -> "Limits":
        """PENDING_PER_HOST, PENDING_PER_AOR, REKEY_RESERVE (percent of the SPI pairs) and
        PENDING_LIFETIME (seconds) from kamailio.cfg; a bad value raises ParamError."""
        values = {field: int_define(get_def, name, default, low, high)
                  for name, field, default, low, high in _DEFINES}
        return cls(values["per_host"], values["per_aor"],
                   spi_pairs * values["reserve_percent"] // 100,
                   float(values["pending_lifetime"]))


@dataclass(frozen=True)
class Pressure:
    """What a challenge that needs a new tunnel finds, in its store transaction.

    `rekey`: it came through a phone's SAs. `free_pairs`: SPI pairs nobody holds. `host`,
    `aor`: the unconfirmed contacts on the phone's address and of its AoR, oldest first,
    this REGISTER's own contact left out. `oldest`: the oldest unconfirmed contacts anywhere
    (a few, oldest first), for when the pool itself is short. `squatters`: unconfirmed
    contacts whose tunnels use the phone ports this challenge offers, on its address."""

    rekey: bool
    free_pairs: int
    host: tuple[int, ...] = ()
    aor: tuple[int, ...] = ()
    oldest: tuple[int, ...] = ()
    squatters: tuple[int, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """`evict`: unconfirmed contacts that go first (then ask again); `refuse`: why this
    challenge gets no tunnel (the 401 becomes a 503). Neither: lease."""

    evict: tuple[int, ...] = ()
    refuse: str = ""


def weigh(limits: Limits, p: Pressure) -> Verdict:
    if p.rekey:
        if p.squatters:
            return Verdict(p.squatters)
        if p.free_pairs > 0 or not p.oldest:
            return Verdict()  # no pair at all: the lease itself says so
        return Verdict(p.oldest[:1])
    evict = _over(p.host, limits.per_host) + _over(p.aor, limits.per_aor)
    if evict:
        return Verdict(tuple(dict.fromkeys(evict)))
    if p.free_pairs > limits.reserve:
        return Verdict()
    if p.oldest:
        return Verdict(p.oldest[:1])
    if p.free_pairs == 0:
        return Verdict()  # none at all, the reserve included: the lease itself says so
    return Verdict(refuse=f"only the {limits.reserve} SPI pair(s) kept for re-keys of "
                          "registered phones are free (REKEY_RESERVE)")


def _over(oldest_first: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """Those that must go so that this challenge's contact makes `limit`."""
    return oldest_first[:max(0, len(oldest_first) - limit + 1)]
