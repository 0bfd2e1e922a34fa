"""Shedding unprotected REGISTERs while Kamailio is overloaded (README: Security model, floods).

An unprotected REGISTER is the one request anyone may send, and the dear one: relayed, its 401
costs a store transaction and 8 kernel entries (`ipsec_create`). When more of them arrive than
the workers can challenge, the 401s wait in the same socket queues as everything else; once a
queue is full the kernel drops whatever comes next, the core's replies included, and TM
answers the phones it relayed 408. Seen in `tests/e2e/test_flood.py` on a slower machine: a
flood at twice what Kamailio could serve left a new phone nothing but 408s, and moved to a
core socket of its own, the re-keys of registered phones got 408.

So while TM holds `OVERLOAD_TRANSACTIONS` or more active transactions (tmx's
`active_transactions`: relayed and not yet answered, all methods), unprotected REGISTERs are
shed before any other work (no transaction, no relay, no store):

- from a *busy* host (more than `QUIET` unprotected REGISTERs in the last second or two, as
  this worker saw them; a phone sends one, and a few retransmissions) they are dropped
  without an answer, as pike does: an answer costs a send, and a flood is not owed one;
- from a quiet host, a new phone, they still get in, up to twice the limit; from there they
  are answered `503` with a `Retry-After` of a few seconds (spread, so that phones shed
  together do not come back together), statelessly; a retransmission of a REGISTER let in
  earlier is left to its transaction instead.

Tried first and measured with the flood test at 800 REGISTERs/s: a 503 to every unprotected
REGISTER at the limit let the flood take every slot TM freed (new phones got nothing but
503s for 30 s); a 503 to busy hosts cost the workers so much that the queue of port 5060
still overflowed, lost the core's 401s, and held TM's count at 100-220 active transactions.
tmx recomputes its figure in each process at most every 2 s (tmx_stats_update), so shedding
starts and stops up to 2 s late in each worker (tests/e2e/test_overload.py waits for it).
Requests through a phone's SAs (re-keys, calls) and requests from the core are never shed,
so registered phones keep their service during the flood. 0 turns shedding off. A flood
from many addresses, each of them quiet, is shed only from twice the limit on.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import KSR

from ipsec.limits import int_define

DEFINE = "OVERLOAD_TRANSACTIONS"
DEFAULT = 1000
HIGHEST = 10_000_000
RETRY_AFTER = (1, 5)  # seconds, drawn evenly
LOG_EVERY = 1.0  # seconds between two log lines of one worker
QUIET = 5  # unprotected REGISTERs a host may send in WINDOW..2 WINDOW and still get in
WINDOW = 1.0
STAT = "$stat(active_transactions)"
SHED, ABSORBED = "shed", "absorbed"


def limit_from_defines(get_def: Callable[[str], str | None]) -> int:
    return int_define(get_def, DEFINE, DEFAULT, 0, HIGHEST)


class Senders:
    """How many unprotected REGISTERs each host sent lately, as one worker saw them: counts in
    the current window and the one before it (so the memory holds at most two windows of
    hosts, whatever a flood spreads over)."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._start: float | None = None
        self._now: dict[str, int] = {}
        self._before: dict[str, int] = {}

    def note(self, host: str, now: float) -> int:
        """Count one from `host`; returns its count over this window and the last."""
        if self._start is None or now - self._start >= self.window:
            recent = self._start is not None and now - self._start < 2 * self.window
            self._before = self._now if recent else {}
            self._now, self._start = {}, now
        self._now[host] = self._now.get(host, 0) + 1
        return self._now[host] + self._before.get(host, 0)


@dataclass(frozen=True)
class Shed:
    why: str
    answer: bool  # 503 + Retry-After; False: dropped without an answer (a busy host)


def must_shed(active: int | None, limit: int, recent: int) -> Shed | None:
    """Whether and how an unprotected REGISTER is shed (None: let in). `recent`: its host's
    count of them lately."""
    if not limit or active is None or active < limit:
        return None
    if recent > QUIET:
        return Shed(f"{active} active transactions ({DEFINE}={limit}) and its host sent "
                    f"{recent} lately", answer=False)
    if active >= 2 * limit:
        return Shed(f"{active} active transactions, twice {DEFINE}={limit}", answer=True)
    return None


class Overload:
    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.senders = Senders()
        self._shed = 0  # since this worker's last log line
        self._logged = float("-inf")

    @classmethod
    def from_defines(cls, get_def: Callable[[str], str | None]) -> "Overload":
        return cls(limit_from_defines(get_def))

    def active(self) -> int | None:
        value = KSR.pv.get(STAT)
        try:
            return int(value)
        except (TypeError, ValueError):
            return None  # tmx not loaded: never shed on a figure we do not have

    def shed(self, host: str) -> str | None:
        """The current request, an unprotected REGISTER from `host`, was dealt with here: SHED
        (dropped, or answered 503), or ABSORBED (a retransmission of one let in: TM resent
        its last reply from its transaction). None: let it in."""
        if not self.limit:
            return None
        now = self.clock()
        recent = self.senders.note(host, now)
        verdict = must_shed(self.active(), self.limit, recent)
        if verdict is None:
            return None
        if verdict.answer:
            if KSR.tm.t_check_trans() == 0:
                return ABSORBED  # a 503 would end, for the phone, a registration on its way
            KSR.hdr.append_to_reply("Retry-After: %d\r\n" % random.randint(*RETRY_AFTER))
            KSR.sl.send_reply(503, "Service Unavailable - Overloaded")
        self._shed += 1
        if now - self._logged >= LOG_EVERY:
            KSR.warn("ims-ipsec: overloaded: REGISTER from %s %s (%s); %d unprotected "
                     "REGISTER(s) shed by this worker since its last such line\n"
                     % (host, "answered 503" if verdict.answer else "dropped", verdict.why,
                        self._shed))
            self._shed, self._logged = 0, now
        return SHED
