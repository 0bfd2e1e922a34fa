"""Real ESP between our P-CSCF side and an independently configured UE, for every alg pair.

The P-CSCF namespace is configured by ipsec.tunnel; the UE namespace by `ip xfrm` commands
written from the 3GPP tables. Traffic on every port pair a P-CSCF uses, UDP and TCP, both
ways, must arrive, be counted on all 8 SAs, and appear on the wire only as ESP.
"""
from __future__ import annotations

import itertools

import pytest

from esp_net import (
    Capture,
    all_pairs_traffic,
    flush_ns,
    packet_counters,
    spis,
    tunnel_for,
    ue_install,
)
from ipsec.algorithms import VALID_PAIRS
from ipsec.tunnel import MARKER, install, remove

_index = itertools.count(1)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(("alg", "ealg"), sorted(VALID_PAIRS))
def test_every_pcscf_port_pair_is_esp(link, x, alg, ealg, family):
    t = tunnel_for(next(_index), family, alg, ealg)
    install(x, t)
    try:
        ue_install(link, t)
        with Capture(link, f"esp-{alg}-{ealg}-{family}") as cap:
            all_pairs_traffic(link, t)

        for ns in (link.pc, link.ue):
            counters = packet_counters(ns)
            assert {spi: counters.get(spi, 0) > 0 for spi in spis(t)} == dict.fromkeys(spis(t), True), ns
        ours = {s.spi: s for s in x.states(user=MARKER)}
        assert set(ours) == spis(t)
        assert all(s.packets > 0 and s.bytes > 0 for s in ours.values())
        assert cap.cleartext() == []
        assert cap.esp_spis() == spis(t)
    finally:
        assert remove(x, t) == []
        flush_ns(link.ue)
    assert x.count_states() == 0 and x.count_policies() == 0
