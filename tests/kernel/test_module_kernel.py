"""ipsec_create / ipsec_forward / ipsec_destroy / startup against a real kernel's XFRM tables.

The module runs as in the unit tests (Module + routing over the KSR double, real SQLite
store), but its `Xfrm` talks netlink to a fresh network namespace per test, and every check
reads the kernel's own dumps: what is installed, with which SPIs, ports and algorithms.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / "kemi" / "double", ROOT / "tests" / "unit", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import invariant  # noqa: E402
import KSR  # noqa: E402
from ipsec import tunnel, warm  # noqa: E402
from ipsec.algorithms import esp_algs  # noqa: E402
from ipsec.store import Lease, UeSide  # noqa: E402
from ipsec.tunnel import MARKER  # noqa: E402
from ipsec.xfrm import SA, Dir, Policy, Selector, Template, Xfrm  # noqa: E402
from kemi.message import KsrMessage  # noqa: E402
from scenario import (AOR, CORE, DOMAIN, OFFER, PCSCF, PORT_UC, PORT_US, UE, Pcscf,  # noqa: E402
                      challenge, register, reply_to, request, server_param)

_names = itertools.count()
KERNEL_ALGS = {  # (alg, ealg) -> (auth, crypt, aead) as the kernel reports them
    ("hmac-sha-1-96", "aes-cbc"): ("hmac(sha1)", "cbc(aes)", None),
    ("hmac-md5-96", "des-ede3-cbc"): ("hmac(md5)", "cbc(des3_ede)", None),
    ("hmac-sha-1-96", "null"): ("hmac(sha1)", "ecb(cipher_null)", None),
    ("null", "aes-gcm"): (None, None, "rfc4106(gcm(aes))"),
    ("aes-gmac", "null"): (None, None, "rfc4543(gcm(aes))"),
}


_started: dict[int, list[Pcscf]] = {}  # id(Xfrm) -> the P-CSCFs started on it


@pytest.fixture
def xfrm():
    """A fresh namespace; at the end, after a sweep (Kamailio's timer runs it every second),
    its kernel state must be what the stores of the P-CSCFs started on it explain, exactly
    (tests/kernel/invariant.py)."""
    ns = f"modk-{next(_names)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    x = Xfrm(netns=ns)
    _started[id(x)] = []
    try:
        yield x
        started = _started.pop(id(x))
        for p in started:
            assert p.module.sweep() == 1
        for store in [p.module.store.path for p in started] or [None]:
            invariant.assert_holds(ns, store, settle=0, ours_only=True)
    finally:
        x.close()
        subprocess.run(["ip", "netns", "del", ns], check=True)


def start(tmp_path, xfrm: Xfrm, **defines: str) -> Pcscf:
    p = Pcscf.start(str(tmp_path / "ipsec.sqlite"), **defines)
    p.module.xfrm = xfrm
    _started[id(xfrm)].append(p)
    return p


def first_401(p: Pcscf, offer: str = OFFER) -> tuple[int, str | None]:
    raw = register(security_client=offer)
    (relay,) = p.request(raw).relays
    rec = p.register_reply(relay, reply_to(raw, 401, "Unauthorized",
                                           (f"WWW-Authenticate: {challenge()}",)))
    found = rec.values("Security-Server")
    return (503 if rec.reply_status else 401), (found[0] if found else None)


def flows_of_server(server: str, offer: str = OFFER) -> set[tuple[str, int, str, int, int]]:
    """33.203 7.1's four SAs from the Security-Server we sent and the phone's offer."""
    spi_c, spi_s, port_c, port_s = (int(server_param(server, n))
                                    for n in ("spi-c", "spi-s", "port-c", "port-s"))
    spi_uc, spi_us = int(server_param(offer, "spi-c")), int(server_param(offer, "spi-s"))
    uc, us = int(server_param(offer, "port-c")), int(server_param(offer, "port-s"))
    return {(UE, uc, PCSCF, port_s, spi_s), (PCSCF, port_s, UE, uc, spi_uc),
            (PCSCF, port_c, UE, us, spi_us), (UE, us, PCSCF, port_c, spi_c)}


def sa_flows(x: Xfrm) -> set[tuple[str, int, str, int, int]]:
    return {(s.sel.src, s.sel.sport, s.sel.dst, s.sel.dport, s.spi) for s in x.states(user=MARKER)}


@pytest.mark.parametrize(("alg", "ealg"), sorted(KERNEL_ALGS))
def test_create_installs_exactly_the_sas_and_policies_of_security_server(tmp_path, xfrm, alg, ealg):
    offer = OFFER.replace("hmac-sha-1-96", alg).replace("aes-cbc", ealg)
    p = start(tmp_path, xfrm)
    status, server = first_401(p, offer)
    assert status == 401, KSR._rec.log_text()
    assert (server_param(server, "alg"), server_param(server, "ealg")) == (alg, ealg)
    states = xfrm.states(user=MARKER)
    assert len(states) == 4 and sa_flows(xfrm) == flows_of_server(server, offer)
    assert {(s.auth, s.crypt, s.aead) for s in states} == {KERNEL_ALGS[(alg, ealg)]}
    pols = xfrm.policies(user=MARKER)
    assert sorted(p_.dir for p_ in pols) == [Dir.IN, Dir.IN, Dir.OUT, Dir.OUT]
    by_reqid = {s.reqid: s for s in states}
    for pol in pols:  # every policy has its SA: same flow, template asks for its reqid
        sa = by_reqid[pol.templates[0].reqid]
        assert (pol.sel.src, pol.sel.sport, pol.sel.dst, pol.sel.dport) == (
            sa.sel.src, sa.sel.sport, sa.sel.dst, sa.sel.dport)
    assert len(xfrm.states()) == 4 and len(xfrm.policies()) == 4  # nothing else of anyone's


def test_forward_target_is_an_sa_protected_pair(tmp_path, xfrm):
    p = start(tmp_path, xfrm)
    server = p.registered()
    rec = p.request(request("INVITE", f"sip:alice@{UE}:5060", via=f"{CORE}:5060"),
                    source=(CORE, 5060, "udp"))
    (relay,) = rec.relays
    assert relay.dst_uri == f"sip:{UE}:{PORT_US}"
    _, _, local_port = relay.send_socket.rpartition(":")
    flow = (PCSCF, int(local_port), UE, PORT_US)
    out = [pol for pol in xfrm.policies(user=MARKER) if pol.dir == Dir.OUT
           and (pol.sel.src, pol.sel.sport, pol.sel.dst, pol.sel.dport) == flow]
    assert len(out) == 1
    (sa,) = [s for s in xfrm.states(user=MARKER) if s.reqid == out[0].templates[0].reqid]
    assert (sa.src, sa.dst, sa.spi) == (PCSCF, UE, int(server_param(OFFER, "spi-s")))
    assert int(local_port) == int(server_param(server, "port-c"))


def test_destroy_in_a_request_leaves_nothing(tmp_path, xfrm):
    p = start(tmp_path, xfrm)
    p.registered()
    KSR._load_request(request("NOTIFY", "sip:bob@ims.example", via=f"{CORE}:5060"),
                      (CORE, 5060, "udp"))
    assert p.module.ipsec_destroy(KsrMessage(), DOMAIN, AOR) == 1
    assert xfrm.states() == [] and xfrm.policies() == []


def test_deregistration_removes_the_sas_at_the_sweep(tmp_path, xfrm):
    p = start(tmp_path, xfrm)
    server = p.registered()
    raw = register(security_verify=server, via=f"{UE}:{PORT_UC}", expires=0, cseq=5)
    (relay,) = p.request(raw, source=(UE, PORT_UC, "udp"),
                         local=(PCSCF, int(server_param(server, "port-s")))).relays
    p.register_reply(relay, reply_to(raw, 200, "OK"))
    assert len(xfrm.states(user=MARKER)) == 4
    p.clock.advance(2)
    p.routing.sweep()
    assert xfrm.states() == [] and xfrm.policies() == []


def test_kernel_refusal_leaves_nothing_of_ours(tmp_path, xfrm):
    """A leftover policy holds one of our selectors (the kernel compares whole selectors,
    marker included): every SA add succeeds, then a policy add is refused (EEXIST) on each
    of the 3 attempts (one port pair only). All of it is rolled back, no lease kept."""
    p = start(tmp_path, xfrm, IPSEC_MAX_CONNECTIONS="1")
    sel = Selector(PCSCF, UE, 5100, PORT_US, user=MARKER)
    xfrm.add_policy(Policy(sel, Dir.OUT, Template(PCSCF, UE, reqid=1)))
    status, server = first_401(p)
    assert (status, server) == (503, None)
    assert xfrm.states() == []
    assert [(pol.sel, pol.dir) for pol in xfrm.policies()] == [(sel, Dir.OUT)]
    assert p.module.store._db().execute("SELECT COUNT(*) FROM tunnels").fetchone() == (0,)
    xfrm.delete_policy(sel, Dir.OUT)  # the test's own leftover


def test_duplicate_spi_in_the_kernel_takes_the_next_lease(tmp_path, xfrm):
    p = start(tmp_path, xfrm)
    algs = esp_algs("hmac-md5-96", "null", bytes(16), bytes(16))
    xfrm.add_sa(SA(CORE, PCSCF, 4096, Selector(CORE, PCSCF), algs))
    status, server = first_401(p)
    assert status == 401 and int(server_param(server, "spi-c")) not in (4096, 4097)
    assert sa_flows(xfrm) == flows_of_server(server)
    assert len(xfrm.states()) == 5


def test_startup_keeps_live_tunnels_and_flushes_strays(tmp_path, xfrm):
    p = start(tmp_path, xfrm)
    p.registered()
    live_sas = {(s.dst, s.spi) for s in xfrm.states()}
    live_pols = {(pol.dir, pol.sel) for pol in xfrm.policies()}
    stray = p.module._kernel_tunnel(PCSCF, UeSide("10.0.0.3", 5111, 5222, 41000, 41001),
                                    Lease(9000, 9001, 5101, 5201), "hmac-md5-96", "null")
    tunnel.install(xfrm, stray)
    algs = esp_algs("hmac-md5-96", "null", bytes(16), bytes(16))
    xfrm.add_sa(SA(CORE, PCSCF, 777, Selector(CORE, PCSCF), algs))  # not ours
    assert len(xfrm.states(user=MARKER)) == 8
    p.module.startup()
    assert {(s.dst, s.spi) for s in xfrm.states(user=MARKER)} == live_sas
    assert {(pol.dir, pol.sel) for pol in xfrm.policies()} == live_pols
    assert (PCSCF, 777) in {(s.dst, s.spi) for s in xfrm.states()}
    p.module.store.delete_contacts([p.module.store.find_by_aor(AOR)[0].id])
    p.module.startup()  # no live tunnel left: all of ours flushed, the foreign SA stays
    assert xfrm.states(user=MARKER) == [] and xfrm.policies(user=MARKER) == []
    assert [(s.dst, s.spi) for s in xfrm.states()] == [(PCSCF, 777)]


def test_warm_up_at_start_is_accepted_for_every_pair_and_leaves_nothing(xfrm):
    """The throw-away SAs that load the kernel's ESP and crypto before the first phone: every
    pair we negotiate is accepted by a kernel with ESP, over IPv4 and IPv6, and none stays."""
    assert warm.warm(xfrm, (4, 6), MARKER) == []
    assert xfrm.states() == [] and xfrm.policies() == []
