"""Kernel hard lifetimes (ipsec/lifetimes.py): what the kernel does with them, on a real kernel.

Measured here: XFRM_MSG_UPDSA on a valid SA takes the new lifetime and keeps the SA's keys
(the message's zero keys are ignored: traffic still passes) and its add_time; UPDPOLICY
replaces a policy with a fresh add_time and the same index. A tunnel nobody renews is removed
by the kernel itself, SAs and policies together; a renewed one outlives its first lifetime.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import replace

import pytest

from esp_net import all_pairs_traffic, flush_ns, packet_counters, spis, tunnel_for, ue_install
from ipsec.tunnel import MARKER, install, renew
from ipsec.xfrm import Lifetime, Xfrm

_index = itertools.count(300)


@pytest.fixture(autouse=True)
def clean(link):
    yield
    flush_ns(link.pc)
    flush_ns(link.ue)


def _count(x: Xfrm) -> tuple[int, int]:
    return x.count_states(MARKER), x.count_policies(MARKER)


def _wait_empty(x: Xfrm, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _count(x) != (0, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize("family", [4, 6])
def test_a_renewed_tunnel_outlives_its_first_lifetime_and_carries_traffic(link, x, family):
    t = tunnel_for(next(_index), family, lifetime=Lifetime(hard=3))
    install(x, t)
    ue_install(link, t)
    added = {s.spi: s for s in x.states(MARKER)}
    assert {s.hard for s in added.values()} == {3}
    index = {p.sel: p.index for p in x.policies(MARKER)}
    time.sleep(1.0)
    now = time.time()
    deadline = now + 6
    # renewal never has the keys: the tunnel given to renew carries zeros
    assert renew(x, replace(t, ck=bytes(16), ik=bytes(16), lifetime=None), deadline, now) == []
    for s in x.states(MARKER):
        assert s.add_time == added[s.spi].add_time  # UPDSA keeps add_time
        assert s.hard == pytest.approx(deadline - s.add_time, abs=1)
    pols = x.policies(MARKER)
    assert {p.sel: p.index for p in pols} == index  # UPDPOLICY keeps the index
    for p in pols:
        assert p.hard == pytest.approx(deadline - p.add_time, abs=1)
    time.sleep(3.0)  # past the first lifetime (3 s after the install)
    assert _count(x) == (4, 4)
    before = packet_counters(link.pc)
    all_pairs_traffic(link, t)  # the zero keys of the update were ignored: ESP still decrypts
    after = packet_counters(link.pc)
    assert all(after[spi] > before.get(spi, 0) for spi in spis(t))
    assert _wait_empty(x, deadline - time.time() + 3)  # and the renewed lifetime does end


def test_a_forgotten_tunnel_goes_by_itself_sas_and_policies(x):
    t = tunnel_for(next(_index), 4, lifetime=Lifetime(hard=2))
    install(x, t)
    assert _count(x) == (4, 4)
    assert _wait_empty(x, 5)


def test_renewing_a_tunnel_the_kernel_dropped_reports_every_piece_missing(x):
    t = tunnel_for(next(_index), 6, lifetime=Lifetime(hard=1))
    install(x, t)
    assert _wait_empty(x, 4)
    gone = renew(x, t, time.time() + 30, time.time())
    assert len(gone) == 8 and _count(x) == (0, 0)  # nothing re-created
