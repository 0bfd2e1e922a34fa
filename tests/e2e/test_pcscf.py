"""End to end: real Kamailio with our kamailio.cfg and KEMI script, real ESP, a phone that
sets up its own SAs with `ip xfrm`, and an S-CSCF stub. Scenarios of issue 6."""
from __future__ import annotations

import time

from checks import through_esp
from pcscf_net import Phone, assert_no_keys, mo_call, mt_call, pcscf_states, wait_gone


def _phone(link, scscf, user, **kw) -> Phone:
    return Phone(link, scscf, user=user, **kw)


def test_register(link, scscf, kamailio):
    phone = _phone(link, scscf, "reg")
    with through_esp(phone, "sa1", "sa3"):
        phone.full_registration()
    assert len([s for s in pcscf_states(link) if s["dst"] == phone.ip]) == 2


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
    with through_esp(phone, "sa1", "sa2"):  # stateless 403s go back on the request's pair
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
