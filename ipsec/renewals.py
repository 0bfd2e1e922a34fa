"""Kernel lifetimes follow registrations, renewed by the sweep in batches.

A 200 OK that registers or refreshes a contact, and a promotion of a pending tunnel, ask for
a renewal in the store, in their own transaction (`renewals` table); the sweep serves what
is asked every second: the contacts as they stand under their phones' locks, all their
tunnels' SAs and policies in one look-up batch and one update batch (ipsec/tunnel.py
`renew_all`). The SAs' lifetimes are counted from their lease's time (they went in after
it), so only the policies are looked up (whose they are). Done in the worker, a renewal was two netlink round trips and two store reads
on the path of every 200 OK; here it is two round trips per second for all phones.

Meanwhile the tunnel keeps the lifetime it had: the pending one (PENDING_LIFETIME + margin
from its install) or the previous registration's, each a margin past what the sweep itself
would wait for, so a sweep late by less than the margin loses nothing. A request the kernel
refuses (other than an entry gone) stays for the next sweep; one asked again while the
sweep served it (a refresh in between: its `seq` moved) stays too.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ipsec import lifetimes, tunnel as kernel
from ipsec.store import REGISTERED, Contact, Store, Tunnel, UeLocks
from ipsec.xfrm import PolicyId, SAId, Xfrm, XfrmError

BATCH = 512  # requests read at once
CHUNK = 64  # contacts whose phones' locks are held at once: a worker waits at most one chunk
# How long one sweep goes on serving while requests remain (of its 1 s period): a burst of
# registrations (phones coming back after an outage) must be renewed within the pending
# lifetime + margin their tunnels were installed with, not at a fixed 512 a second.
BUDGET = 0.5

@dataclass
class Outcome:
    renewed: int = 0
    missing: list[tuple[Contact, list[SAId | PolicyId]]] = field(default_factory=list)
    refused: list[tuple[Contact, XfrmError]] = field(default_factory=list)


def renew_due(store: Store, xfrm: Xfrm, locks: UeLocks, spec_of: Callable[[Tunnel], kernel.Tunnel],
              grace: float, margin: float, now: float, limit: int | None = None,
              budget: float | None = None,
              clock: Callable[[], float] = time.monotonic) -> Outcome:
    """Serve the renewal requests, `limit` read at a time in contact order and CHUNK
    renewed at a time, each at most once per call, until none is left or `budget` seconds
    have gone (the first `limit` are always served). Raises what the store or the netlink
    socket raises (the requests not yet served then stay)."""
    limit = BATCH if limit is None else limit
    out = Outcome()
    until = clock() + (BUDGET if budget is None else budget)
    after = 0
    while True:
        due = store.renewals_due(limit, after=after)
        for i in range(0, len(due), CHUNK):
            _renew_chunk(store, xfrm, locks, spec_of, grace, margin, now,
                         dict(due[i:i + CHUNK]), out)
        if len(due) < limit or clock() >= until:
            return out
        after = due[-1][0]


def _renew_chunk(store: Store, xfrm: Xfrm, locks: UeLocks,
                 spec_of: Callable[[Tunnel], kernel.Tunnel], grace: float, margin: float,
                 now: float, due: dict[int, int], out: Outcome) -> None:
    hosts = {c.tunnel.ue.host for c in store.get_contacts(due) if c.tunnel is not None}
    with locks.all_held(hosts):
        contacts = store.get_contacts(due)  # as they stand now that no worker changes them
        found = {c.id for c in contacts}
        done = [(cid, seq) for cid, seq in due.items() if cid not in found]  # gone meanwhile
        jobs: list[Contact] = []
        for c in contacts:
            if c.state != REGISTERED or c.tunnel is None:
                done.append((c.id, due[c.id]))  # nothing in use to renew
            elif c.tunnel.ue.host in hosts:
                jobs.append(c)
            # else its tunnel is now on an address whose lock is not held: next sweep
        since = store.leased_at(c.tunnel.lease.spi_pc for c in jobs)
        results = kernel.renew_all(
            xfrm, [(spec_of(c.tunnel), lifetimes.registered_deadline(c.expires, grace, margin))
                   for c in jobs], now,
            added=[since.get(c.tunnel.lease.spi_pc) for c in jobs])
        for c, r in zip(jobs, results):
            if r.error is not None:
                out.refused.append((c, r.error))
                continue
            done.append((c.id, due[c.id]))
            out.renewed += 1
            if r.missing:
                out.missing.append((c, r.missing))
        store.renewed(done)
