"""Flush by marker with 10,000 of our states and their 10,000 policies present.

The C module flushed with one 8 KiB batch and left all but about a hundred SAs behind; ours
must remove every marked entry, however many, and nothing of anyone else's.
"""
from __future__ import annotations

import subprocess

import pytest

from esp_net import CK, IK, run
from ipsec.algorithms import esp_algs
from ipsec.tunnel import MARKER, Tunnel, install, policies, sas
from ipsec.xfrm import Xfrm, new_policy, new_sa

TUNNELS = 2500  # x 4 = 10,000 states and 10,000 policies
OTHER_MARKER = 143956232  # the C module's
PCSCF = "10.88.0.1"


def _tunnel(i: int, marker: int = MARKER) -> Tunnel:
    ue = f"10.89.{i // 250}.{i % 250 + 1}"
    return Tunnel(pcscf=PCSCF, ue=ue, port_pc=5100, port_ps=5101, port_uc=6100, port_us=6101,
                  spi_pc=0x100000 + 2 * i, spi_ps=0x100001 + 2 * i, spi_uc=0x2000, spi_us=0x2001,
                  alg="hmac-sha-1-96", ealg="aes-cbc", ck=CK, ik=IK, marker=marker)


@pytest.fixture(scope="module")
def x():
    subprocess.run(["ip", "netns", "add", "flush"], check=True)
    x = Xfrm(netns="flush")
    yield x
    x.close()
    subprocess.run(["ip", "netns", "del", "flush"], check=True)


def _foreign_ip_lines(n: int) -> str:
    lines = []
    for i in range(n):
        src, dst = f"10.90.0.{i + 1}", "10.88.0.1"
        lines.append(f"xfrm state add src {src} dst {dst} proto esp spi {0x300 + i} reqid {i + 1} "
                     f"mode transport enc 'cbc(aes)' 0x{'22' * 16} sel src {src} dst {dst}")
        lines.append(f"xfrm policy add src {src} dst {dst} dir in "
                     f"tmpl src {src} dst {dst} proto esp reqid {i + 1} mode transport")
    return "\n".join(lines) + "\n"


def test_flush_removes_all_of_ours_and_nothing_else(x):
    algs = esp_algs("hmac-sha-1-96", "aes-cbc", CK, IK)
    requests = []
    for i in range(TUNNELS):
        t = _tunnel(i)
        requests += [new_sa(sa) for sa in sas(t, algs)] + [new_policy(p) for p in policies(t)]
    assert x.batch(requests) == [None] * len(requests)
    install(x, _tunnel(TUNNELS, marker=OTHER_MARKER))
    run("ip", "-n", "flush", "-batch", "-", stdin=_foreign_ip_lines(50))
    others_before = (
        sorted((s.dst, s.spi) for s in x.states() if s.sel.user != MARKER),
        sorted(p.index for p in x.policies() if p.sel.user != MARKER),
    )
    assert x.count_states(MARKER) == 4 * TUNNELS and x.count_policies(MARKER) == 4 * TUNNELS

    flushed = x.flush(MARKER)

    assert (flushed.states, flushed.policies) == (4 * TUNNELS, 4 * TUNNELS)
    assert x.count_states(MARKER) == 0 and x.count_policies(MARKER) == 0
    others_after = (
        sorted((s.dst, s.spi) for s in x.states()),
        sorted(p.index for p in x.policies()),
    )
    assert others_after == others_before
    assert len(others_after[0]) == 54 and len(others_after[1]) == 54
    assert "SAD count 54" in run("ip", "-n", "flush", "xfrm", "state", "count")
