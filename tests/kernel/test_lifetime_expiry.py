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

import invariant
import test_module_kernel as tmk
from esp_net import all_pairs_traffic, flush_ns, packet_counters, spis, tunnel_for, ue_install
from ipsec.tunnel import MARKER, install, renew
from ipsec.xfrm import Lifetime, Xfrm

_index = itertools.count(300)
xfrm = tmk.xfrm  # the fixture: a fresh namespace, the invariant checked at its end


def xfrm_ns(x: Xfrm) -> str:
    return x._netns


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


# -- through the module (its store and its clock), in a namespace of its own ---------------

def _module_start(tmp_path, xfrm):
    """A P-CSCF with short lifetimes: pending 5 s + margin 1 s; grace 1 s."""
    p = tmk.start(tmp_path, xfrm, PENDING_LIFETIME="5", LIFETIME_MARGIN="1", EXPIRY_GRACE="1")
    p.clock.now = time.time()
    return p


def test_the_kernel_removes_a_tunnel_the_module_forgot(tmp_path, xfrm):
    """A store restored from an old copy (or a bug) forgets a tunnel the kernel holds: the
    kernel removes its SAs and policies by itself, PENDING_LIFETIME + margin later."""
    p = _module_start(tmp_path, xfrm)
    status, _ = tmk.first_401(p)
    assert status == 401
    assert _count(xfrm) == (4, 4)
    assert {s.hard for s in xfrm.states(MARKER)} == {6}
    with p.module.store._tx() as db:  # forgotten, without the kernel being told
        db.execute("DELETE FROM contacts")
        db.execute("DELETE FROM tunnels")
    assert _wait_empty(xfrm, 9)


def test_a_registered_tunnel_refreshed_survives_its_earlier_lifetimes(tmp_path, xfrm):
    p = _module_start(tmp_path, xfrm)
    t0 = time.time()
    server = p.registered(expires=10)  # 200 OK: asks the sweep for a renewal
    p.module.sweep()  # lifetime to t0 + 10 + 1 + 1
    assert invariant.problems(xfrm_ns(xfrm), p.module.store.path, lifetimes=True,
                              ours_only=True) == []
    time.sleep(max(0.0, t0 + 7.5 - time.time()))  # past the pending lifetime (6 s)
    assert _count(xfrm) == (4, 4)
    p.clock.now = time.time()
    p.refreshed(server, cseq=10, expires=10)
    p.module.sweep()  # lifetime to t0 + 7.5 + 12
    time.sleep(max(0.0, t0 + 14 - time.time()))  # past the first registration's (12 s)
    assert _count(xfrm) == (4, 4)
    hards = {s.hard for s in xfrm.states(MARKER)}
    assert all(18 <= h <= 21 for h in hards), hards
    p.clock.now = time.time()
