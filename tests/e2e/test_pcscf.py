"""End to end: real Kamailio with our kamailio.cfg and KEMI script, real ESP, a phone that
sets up its own SAs with `ip xfrm`, and an S-CSCF stub. Scenarios of issue 6."""
from __future__ import annotations

import sqlite3
import time

import invariant
from checks import assert_store_matches_kernel, through_esp
from pcscf_net import Phone, assert_no_keys, mo_call, mt_call, pcscf_states, wait_gone


def _phone(link, scscf, user, **kw) -> Phone:
    return Phone(link, scscf, user=user, **kw)


def test_register(link, scscf, kamailio):
    phone = _phone(link, scscf, "reg")
    with through_esp(phone, "sa1", "sa3"):
        phone.full_registration()
    assert len([s for s in pcscf_states(link) if s["dst"] == phone.ip]) == 2


def test_kamailios_sweep_moves_the_kernel_lifetime_to_the_registrations(link, scscf, kamailio):
    """The 200 OK asks; the sweep (rtimer, every second) moves the hard lifetime of the
    phone's 4 SAs and 4 policies from the pending one (PENDING_LIFETIME 30 + margin 60) to
    the registration's: expiry 600 + EXPIRY_GRACE 2 + margin 60 (+1 for a whole second)."""
    phone = _phone(link, scscf, "lifetime")
    phone.full_registration()
    ports = {phone.tunnel.port_uc, phone.tunnel.port_us}  # phones here share one address
    mine = lambda entries: [e for e in entries if ports & {e.sel[4], e.sel[5]}]
    assert len(mine(invariant.kernel_sas(link.pc))) == 4
    deadline = time.monotonic() + 5
    while True:
        hards = ({s.hard for s in mine(invariant.kernel_sas(link.pc))},
                 {p.hard for p in mine(invariant.kernel_policies(link.pc))})
        if all(h and min(h) >= 600 for h in hards) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(h and h <= set(range(600 + 2 + 60 - 3, 600 + 2 + 60 + 3)) for h in hards), hards
    with through_esp(phone, "sa1", "sa3"):
        mo_call(phone, scscf)  # still carrying traffic after the update


def test_retransmissions_during_processing_make_one_transaction(link, scscf, kamailio):
    """Copies of a REGISTER that reach other workers while the first is still in the route
    (here: waiting for the store, which another process holds, as a big sweep would) are
    absorbed by its transaction: one REGISTER reaches the core, one challenge, one tunnel.
    Before, each copy was relayed, challenged and given SAs, and the 401 the phone used
    named SAs the store had lost."""
    phone = _phone(link, scscf, "impatient")
    seen = len(scscf.seen)
    store = sqlite3.connect(kamailio.run_dir / "ipsec-pcscf.sqlite", isolation_level=None)
    store.execute("BEGIN IMMEDIATE")
    try:
        m = phone.register(protected=False)
        phone.retransmit(4)
        time.sleep(1.5)
    finally:
        store.execute("COMMIT")
        store.close()
    r401, _, _ = phone.wait_reply(401, "REGISTER")
    time.sleep(1.0)  # whatever else the copies caused has arrived by now
    call = [x for x in scscf.seen[seen:] if x.is_request and x.get("Call-ID") == m.get("Call-ID")]
    assert len(call) == 1, f"{len(call)} REGISTERs reached the core"
    servers = {x.get("Security-Server") for x in phone.seen if not x.is_request and x.status == 401}
    assert servers == {r401.get("Security-Server")}
    mine = [s for s in pcscf_states(link) if s["dst"] == phone.ip and s["dport"] in
            (phone.offer_uc, phone.offer_us)]
    assert len(mine) == 2, mine
    phone.pending = phone.setup_sas(r401)
    with through_esp(phone, "sa1", "sa3"):
        phone.authenticate()


def test_reregistration_reuses_tunnel_when_keys_unchanged(link, scscf, kamailio):
    phone = _phone(link, scscf, "reuse")
    scscf.fixed_keys = (bytes(range(16)), bytes(range(16, 32)))
    try:
        phone.full_registration()
        first = phone.tunnel
        with through_esp(phone, "sa1", "sa3"):
            phone.full_registration()  # same offer, same keys
        assert phone.tunnel == first
        assert {s["spi"] for s in pcscf_states(link)} >= {first.spi_pc, first.spi_ps}
    finally:
        scscf.fixed_keys = None


def test_reregistration_new_tunnel_when_keys_change(link, scscf, kamailio):
    phone = _phone(link, scscf, "rekey")
    phone.full_registration()
    old = phone.tunnel
    phone.new_offer(keep_server_port=True)
    with through_esp(phone, "sa1", "sa3"):
        phone.full_registration()
    new = phone.tunnel
    assert new.port_us == old.port_us and (new.spi_pc, new.spi_ps) != (old.spi_pc, old.spi_ps)
    assert wait_gone(link, old, timeout=3)
    assert {new.spi_pc, new.spi_ps} <= {s["spi"] for s in pcscf_states(link)}


def test_mobile_terminated_call(link, scscf, kamailio):
    phone = _phone(link, scscf, "mt")
    phone.full_registration()
    with through_esp(phone, "sa3", "sa4"):
        mt_call(phone, scscf)


def test_mobile_originated_call(link, scscf, kamailio):
    phone = _phone(link, scscf, "mo")
    phone.full_registration()
    with through_esp(phone, "sa1", "sa3"):
        mo_call(phone, scscf)


def test_tcp_register_and_calls(link, scscf, kamailio):
    phone = _phone(link, scscf, "tcp", proto="tcp")
    with through_esp(phone, "sa1", "sa2"):
        phone.full_registration()
        mo_call(phone, scscf)
    with through_esp(phone, "sa3", "sa4"):
        mt_call(phone, scscf)


def test_ipv6_register_and_calls(link, scscf, kamailio):
    phone = _phone(link, scscf, "six", family=6)
    with through_esp(phone, "sa1", "sa3", "sa4"):
        phone.full_registration()
        mo_call(phone, scscf)
        mt_call(phone, scscf)


def test_security_verify_mismatch_is_refused(link, scscf, kamailio):
    phone = _phone(link, scscf, "liar")
    phone.challenge(protected=False)
    phone.tunnel = phone.pending
    seen = len(scscf.seen)
    bad = phone.security_server.replace("spi-c=", "spi-c=1")
    with through_esp(phone, "sa1", "sa3"):  # a 403 leaves through the SAs like every reply
        phone.register(protected=True, verify=bad, response=True)
        phone.wait_reply(403, "REGISTER")
        phone.register(protected=True, verify=None, response=True)
        phone.wait_reply(403, "REGISTER")
    assert not [m for m in scscf.seen[seen:] if m.is_request and m.method == "REGISTER"]


def test_deregistration_removes_tunnel_after_the_200_ok(link, scscf, kamailio):
    phone = _phone(link, scscf, "bye")
    phone.full_registration()
    with through_esp(phone, "sa1", "sa3"):
        phone.register(protected=True, expires=0, verify=phone.security_server, response=True)
        phone.wait_reply(200, "REGISTER")
    assert wait_gone(link, phone.tunnel, timeout=6)


def test_expiry_sweeps_the_tunnel(link, scscf, kamailio):
    phone = _phone(link, scscf, "short")
    scscf.expires = 3
    try:
        with through_esp(phone, "sa1", "sa3"):
            phone.full_registration(expires=3)
    finally:
        scscf.expires = None
    assert wait_gone(link, phone.tunnel, timeout=15)


def test_register_without_security_client_gets_421(link, scscf, kamailio):
    phone = _phone(link, scscf, "nosec")
    seen = len(scscf.seen)
    phone.register(protected=False, client="")
    r, _, _ = phone.wait_reply(421, "REGISTER")
    assert "sec-agree" in (r.get("Require") or "")
    assert not [m for m in scscf.seen[seen:] if m.is_request]


def test_unusable_offer_gets_503_without_the_keys(link, scscf, kamailio):
    phone = _phone(link, scscf, "oddball")
    before = {s["spi"] for s in pcscf_states(link)}
    phone.register(protected=False, client=phone.security_client().replace(
        "alg=hmac-sha-1-96", "alg=hmac-sha-256-128"))
    r, _, _ = phone.wait_reply(503, "REGISTER")
    assert r.get("WWW-Authenticate") is None and r.get("Security-Server") is None
    assert_no_keys(r)
    assert {s["spi"] for s in pcscf_states(link)} == before


def test_registering_again_right_after_deregistering(link, scscf, kamailio):
    """The de-registered tunnel goes a moment after its 200 OK; a registration started in
    that moment must not be swept with it."""
    phone = _phone(link, scscf, "again")
    phone.full_registration()
    old = phone.tunnel
    phone.register(protected=True, expires=0, verify=phone.security_server, response=True)
    phone.wait_reply(200, "REGISTER")
    phone.drop_sas(old)
    phone.tunnel = None
    phone.new_offer()
    phone.challenge(protected=False)
    time.sleep(2.5)  # the old tunnel's teardown falls due while this registration is pending
    phone.authenticate()
    assert wait_gone(link, old, timeout=6)
    with through_esp(phone, "sa1", "sa3"):
        mo_call(phone, scscf)


def _store(kamailio):
    return kamailio.run_dir / "ipsec-pcscf.sqlite"


def test_a_second_challenge_to_one_register_keeps_the_first_tunnel(link, scscf, kamailio):
    """The core answers a REGISTER twice with different keys (a stateless core answering TM's
    retransmission): TM relays the first 401, and its SAs must be the ones that stay."""
    phone = _phone(link, scscf, "twice")
    scscf.second_challenge = True
    try:
        phone.challenge(protected=False)
        time.sleep(0.5)  # the second 401 has been through the reply route by now
    finally:
        scscf.second_challenge = False
    assert_store_matches_kernel(link, _store(kamailio))
    with through_esp(phone, "sa1", "sa3"):
        phone.authenticate()
    assert_store_matches_kernel(link, _store(kamailio))


def test_a_new_register_with_the_same_offer_replaces_the_unanswered_one(link, scscf, kamailio):
    """The phone starts a second REGISTER (same Security-Client) before the first is
    answered: it acts on the second 401, whose SAs replace the first's."""
    phone = _phone(link, scscf, "restart")
    phone.register(protected=False)
    phone.challenge(protected=False)
    time.sleep(0.5)
    assert_store_matches_kernel(link, _store(kamailio))
    with through_esp(phone, "sa1", "sa3"):
        phone.authenticate()
    assert_store_matches_kernel(link, _store(kamailio))


def test_rekey_with_new_ports_then_a_call_to_the_phone(link, scscf, kamailio):
    """33.203 7.4 with new SPIs AND new ports: the REGISTER through the new SAs names the new
    protected server port in its Contact; calls to it must arrive (before: 480)."""
    phone = _phone(link, scscf, "moving")
    phone.full_registration()
    old = phone.tunnel
    phone.new_offer()  # new port_uc and port_us
    phone.full_registration()
    assert phone.tunnel.port_us != old.port_us
    assert wait_gone(link, old, timeout=3)
    with through_esp(phone, "sa3", "sa4"):
        mt_call(phone, scscf)


def test_udp_first_then_tcp_on_the_protected_ports(link, scscf, kamailio):
    """The first REGISTER over UDP, then TCP through the SAs with ;transport=tcp in the
    Contact: calls to the phone come over TCP (before: over UDP)."""
    phone = _phone(link, scscf, "switcher")
    phone.challenge(protected=False)
    phone.proto = "tcp"
    phone.authenticate()
    with through_esp(phone, "sa3", "sa4"):
        mt_call(phone, scscf)
