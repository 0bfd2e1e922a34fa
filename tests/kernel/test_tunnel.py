"""Tunnel install/remove against a real kernel: rollback, duplicates, reqid, in-dialog flows."""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import replace

import pytest

from esp_net import (
    Capture,
    all_pairs_traffic,
    flush_ns,
    packet_counters,
    run,
    spis,
    tunnel_for,
    ue_install,
    udp,
)
from ipsec.tunnel import MARKER, Tunnel, install, policies, remove
from ipsec.xfrm import (
    Dir,
    Lifetime,
    Policy,
    PolicyId,
    SAId,
    Selector,
    Template,
    Xfrm,
    XfrmExists,
)

_index = itertools.count(1)


@pytest.fixture(autouse=True)
def clean(link):
    yield
    flush_ns(link.pc)
    flush_ns(link.ue)


def _empty(x: Xfrm) -> bool:
    return x.count_states() == 0 and x.count_policies() == 0


SA_TARGETS = ["pcscf", "ue", "ue", "pcscf"]  # destination of SA1..SA4
SA_SPIS = ["spi_ps", "spi_uc", "spi_us", "spi_pc"]


@pytest.mark.parametrize("k", range(4))
def test_sa_refused_at_step_k_leaves_nothing(link, x, k):
    t = tunnel_for(next(_index), 4)
    dst, spi = getattr(t, SA_TARGETS[k]), getattr(t, SA_SPIS[k])
    # another owner already holds (dst, spi): the kernel refuses our SA number k+1
    run("ip", "-n", link.pc, "xfrm", "state", "add", "src", "10.77.0.9", "dst", dst,
        "proto", "esp", "spi", str(spi), "mode", "transport", "enc", "cbc(aes)", "0x" + "11" * 16)
    with pytest.raises(XfrmExists) as e:
        install(x, t)
    assert e.value.op == "add" and e.value.what.spi == spi
    assert f"spi 0x{spi:08x}" in str(e.value) and "EEXIST" in str(e.value)
    assert x.count_states(MARKER) == 0 and x.count_policies() == 0
    assert [(s.dst, s.spi, s.src) for s in x.states()] == [(dst, spi, "10.77.0.9")]


@pytest.mark.parametrize("k", range(4))
def test_policy_refused_at_step_k_leaves_nothing(link, x, k):
    t = tunnel_for(next(_index), 6)
    stale = dataclasses.replace(policies(t)[k], tmpl=Template("fd77::9", "fd77::8", reqid=7))
    x.add_policy(stale)  # e.g. left by a crashed run: same selector, same marker
    with pytest.raises(XfrmExists) as e:
        install(x, t)
    assert e.value.what == policies(t)[k]
    assert x.count_states() == 0
    (left,) = x.policies()
    assert (left.sel, left.dir, left.templates[0].reqid) == (stale.sel, stale.dir, 7)


def test_broken_socket_during_policies_removes_the_sas(x, mocker):
    t = tunnel_for(next(_index), 4)
    real = x.batch
    calls = []

    def batch(requests, replies=None):
        calls.append(len(requests))
        if len(calls) == 2:
            raise OSError("injected: netlink socket failed")
        return real(requests, replies)

    mocker.patch.object(x, "batch", side_effect=batch)
    with pytest.raises(OSError, match="injected"):
        install(x, t)
    mocker.stopall()
    assert _empty(x)


def test_duplicate_spi_is_a_clear_error_and_leaves_the_first_tunnel(x):
    first = tunnel_for(next(_index), 4)
    install(x, first)
    # a second registration whose SPI the P-CSCF (wrongly) handed out twice
    second = dataclasses.replace(tunnel_for(next(_index), 4), spi_pc=first.spi_pc)
    with pytest.raises(XfrmExists) as e:
        install(x, second)
    text = str(e.value) + repr(e.value)
    assert f"spi 0x{first.spi_pc:08x}" in text and "EEXIST" in text and "add" in text
    assert first.ck.hex() not in text and first.ik.hex() not in text
    assert {s.spi for s in x.states()} == spis(first)
    assert {(p.sel.sport, p.sel.dport) for p in x.policies()} == {
        (p.sel.sport, p.sel.dport) for p in policies(first)
    }
    assert remove(x, first) == []
    assert _empty(x)


def test_remove_reports_pieces_already_gone(link, x):
    t = tunnel_for(next(_index), 6)
    install(x, t)
    run("ip", "-n", link.pc, "xfrm", "state", "delete", "src", t.pcscf, "dst", t.ue,
        "proto", "esp", "spi", str(t.spi_us))
    x.delete_policy(policies(t)[0].sel, Dir.IN)
    missing = remove(x, t)
    assert missing == [PolicyId(Dir.IN, policies(t)[0].sel), SAId(t.ue, t.spi_us)]
    assert _empty(x)


def test_two_tunnels_of_one_ue_use_their_own_sas(link, x):
    """reqid = SPI: a UE's second tunnel (other ports) never borrows the first one's SAs."""
    one, two = tunnel_for(next(_index), 4), tunnel_for(next(_index), 4)
    for t in (one, two):
        install(x, t)
        ue_install(link, t)
    all_pairs_traffic(link, two)
    counters = packet_counters(link.pc)
    assert all(counters[spi] > 0 for spi in spis(two))
    assert all(counters[spi] == 0 for spi in spis(one))
    all_pairs_traffic(link, one)
    assert all(packet_counters(link.pc)[spi] > 0 for spi in spis(one))


def _ps_to_us(t: Tunnel) -> Selector:
    return Selector(t.pcscf, t.ue, t.port_ps, t.port_us, user=MARKER)


def test_c_module_in_dialog_policy_without_its_sa_drops_packets(link, x):
    """The C module adds a policy for ps->us that reuses SA3's SPI, so its SA is never added.

    A policy whose template no SA satisfies makes the kernel drop the flow: the packet never
    reaches the wire. This is why the tunnel installs no such policy.
    """
    t = tunnel_for(next(_index), 4)
    install(x, t)
    ue_install(link, t)
    x.add_policy(Policy(_ps_to_us(t), Dir.OUT, Template(t.pcscf, t.ue, reqid=t.spi_us)))
    with Capture(link, "in-dialog-policy") as cap:
        assert not udp(link.pc, t.pcscf, t.port_ps, link.ue, t.ue, t.port_us, timeout=0.5)
    assert [p for p in cap.packets if p.src == t.pcscf] == []


def test_a_pair_outside_the_four_is_not_protected(link, x):
    """ps->us has no SA: such a packet leaves in clear text, so replies must use pc->us."""
    t = tunnel_for(next(_index), 6)
    install(x, t)
    ue_install(link, t)
    with Capture(link, "outside-pairs") as cap:
        # UE-side policies cover only its four pairs too, so the datagram arrives in clear
        assert udp(link.pc, t.pcscf, t.port_ps, link.ue, t.ue, t.port_us)
        all_pairs_traffic(link, t)
    assert {(p.sport, p.dport) for p in cap.cleartext()} == {(t.port_ps, t.port_us)}
    assert cap.esp_spis() == spis(t)


def test_hard_lifetime_expires_sas_and_policies_together(x):
    t = tunnel_for(next(_index), 4, lifetime=Lifetime(soft=0, hard=1))
    install(x, t)
    assert x.count_states(MARKER) == 4 and x.count_policies(MARKER) == 4
    deadline = time.monotonic() + 5
    while not _empty(x) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert _empty(x)


def test_removing_a_tunnel_never_takes_the_policies_another_holds_on_the_same_flows(x):
    """Two tunnels on the same addresses and ports (a stale record, phones reusing addresses
    and ports): the kernel holds one policy per flow. The second's install is refused and
    rolled back; removing it afterwards (as the sweep removes a stale lease) leaves the
    first's policies, which name the first's SAs, in place (before: removal by selector took
    them, leaving SAs without policies)."""
    first = tunnel_for(next(_index), 4)
    install(x, first)
    second = replace(first, spi_pc=first.spi_pc + 100, spi_ps=first.spi_ps + 100,
                     spi_uc=first.spi_uc + 100, spi_us=first.spi_us + 100)
    with pytest.raises(XfrmExists):
        install(x, second)
    before = {(p.dir, p.sel, p.templates) for p in x.policies(MARKER)}
    assert len(before) == 4
    gone = remove(x, second)
    assert len(gone) == 8  # its 4 SAs were rolled back, its 4 flows' policies are the first's
    assert {(p.dir, p.sel, p.templates) for p in x.policies(MARKER)} == before
    assert {s.spi for s in x.states(MARKER)} == spis(first)
    assert remove(x, first) == [] and _empty(x)
