"""End to end: real Kamailio with our kamailio.cfg and KEMI script, real ESP, a phone that
sets up its own SAs with `ip xfrm`, and an S-CSCF stub. Scenarios of issue 6."""
from __future__ import annotations

import time

from checks import through_esp
from pcscf_net import Phone, Scscf, pcscf_policy_count, pcscf_states
from sip import token, uri_of


def _phone(link, scscf, user, **kw) -> Phone:
    return Phone(link, scscf, user=user, **kw)


def _mt_call(phone: Phone, scscf: Scscf) -> None:
    """The S-CSCF calls the phone through the P-CSCF (Path as Route); phone answers; BYE."""
    path = uri_of(scscf.paths[phone.aor])
    call_id, ftag = token(), token()
    ruri = f"sip:{phone.user}@{phone.ip if phone.family == 4 else '[' + phone.ip + ']'}:{phone.tunnel.port_us}"
    to = f"<sip:{phone.user}@ims.test>"
    invite = scscf.new_request("INVITE", ruri, call_id=call_id, from_tag=ftag, to=to, cseq=1,
                               route=[f"<{path}>"])
    scscf.request(invite)
    req, key, peer = phone.wait(lambda m: m.is_request and m.method == "INVITE", "INVITE")
    assert peer[1] == phone.tunnel.port_pc
    tag = token()
    phone.respond(req, key, 180, "Ringing", tag)
    ok = phone.respond(req, key, 200, "OK", tag)
    r200 = scscf.wait_reply(200, "INVITE")
    routes = [v for v in reversed(r200.all("Record-Route"))]
    to_tagged = r200.get("To")
    for method, cseq in (("ACK", 1), ("BYE", 2)):
        m = scscf.new_request(method, uri_of(r200.get("Contact")), call_id=call_id, from_tag=ftag,
                              to=to_tagged, cseq=cseq, route=routes)
        scscf.request(m)
        got, key, _ = phone.wait(lambda x, method=method: x.is_request and x.method == method, method)
    phone.respond(got, key, 200, "OK", tag)
    scscf.wait_reply(200, "BYE")


def _mo_call(phone: Phone, scscf: Scscf) -> None:
    """The phone calls out through its SAs; 100/180/200 come back through them; ACK; BYE."""
    call_id = token()
    t = phone.tunnel
    host = phone.pcscf if phone.family == 4 else f"[{phone.pcscf}]"
    route = f"<sip:{host}:{t.port_ps};lr" + (";transport=tcp>" if phone.proto == "tcp" else ">")
    phone.request("INVITE", "sip:bob@ims.test", call_id=call_id, to="<sip:bob@ims.test>", route=route)
    ok, _, _ = phone.wait_reply(200, "INVITE")
    routes = list(reversed(ok.all("Record-Route")))
    assert routes and f":{t.port_ps};" in routes[0], routes
    for method in ("ACK", "BYE"):
        m = phone._request(method, uri_of(ok.get("Contact")), t.port_us)
        for r in routes:
            m.add("Route", r)
        m.add("To", ok.get("To"))
        m.add("Call-ID", call_id)
        m.add("CSeq", f"{phone.cseq} {method}")
        phone.send_protected(m)
    try:
        phone.wait_reply(200, "BYE")
    except AssertionError:
        print([m.text() for m in phone.seen[-3:]]); print(phone.scscf_kamailio_log())
        raise


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
    phone.new_offer()
    with through_esp(phone, "sa1", "sa3"):
        phone.full_registration()
    new = phone.tunnel
    assert (new.spi_pc, new.spi_ps) != (old.spi_pc, old.spi_ps)
    time.sleep(0.5)
    spis = {s["spi"] for s in pcscf_states(link)}
    assert new.spi_pc in spis and old.spi_pc not in spis and old.spi_ps not in spis


def test_mobile_terminated_call(link, scscf, kamailio):
    phone = _phone(link, scscf, "mt")
    phone.full_registration()
    with through_esp(phone, "sa3", "sa4"):
        _mt_call(phone, scscf)


def test_mobile_originated_call(link, scscf, kamailio):
    phone = _phone(link, scscf, "mo")
    phone.scscf_kamailio_log = kamailio.log
    phone.full_registration()
    with through_esp(phone, "sa1", "sa3"):
        _mo_call(phone, scscf)


def test_tcp_register_and_calls(link, scscf, kamailio):
    phone = _phone(link, scscf, "tcp", proto="tcp")
    with through_esp(phone, "sa1", "sa2"):
        phone.full_registration()
        _mo_call(phone, scscf)
    with through_esp(phone, "sa3", "sa4"):
        _mt_call(phone, scscf)


def test_ipv6_register_and_calls(link, scscf, kamailio):
    phone = _phone(link, scscf, "six", family=6)
    with through_esp(phone, "sa1", "sa3", "sa4"):
        phone.full_registration()
        _mo_call(phone, scscf)
        _mt_call(phone, scscf)


def test_security_verify_mismatch_is_refused(link, scscf, kamailio):
    phone = _phone(link, scscf, "liar")
    phone.challenge(protected=False)
    phone.tunnel = phone.pending
    seen = len(scscf.seen)
    bad = phone.security_server.replace("spi-c=", "spi-c=1")
    phone.register(protected=True, verify=bad, response=True)
    r, _, _ = phone.wait_reply(403, "REGISTER")
    phone.register(protected=True, verify=None, response=True)
    phone.wait_reply(403, "REGISTER")
    assert not [m for m in scscf.seen[seen:] if m.is_request and m.method == "REGISTER"]


def test_deregistration_removes_tunnel_after_the_200_ok(link, scscf, kamailio):
    phone = _phone(link, scscf, "bye")
    phone.full_registration()
    with through_esp(phone, "sa1", "sa3"):
        phone.register(protected=True, expires=0, verify=phone.security_server, response=True)
        phone.wait_reply(200, "REGISTER")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and any(s["dst"] == phone.ip or s["src"] == phone.ip
                                                for s in pcscf_states(link)
                                                if s["spi"] in (phone.tunnel.spi_pc, phone.tunnel.spi_us)):
        time.sleep(0.2)
    spis = {s["spi"] for s in pcscf_states(link)}
    t = phone.tunnel
    assert not spis & {t.spi_pc, t.spi_ps, t.spi_uc, t.spi_us}


def test_expiry_sweeps_the_tunnel(link, scscf, kamailio):
    phone = _phone(link, scscf, "short")
    scscf.expires = 1
    try:
        phone.full_registration(expires=1)
    finally:
        scscf.expires = None
    t = phone.tunnel
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {s["spi"] for s in pcscf_states(link)} & {t.spi_pc, t.spi_ps}:
        time.sleep(0.3)
    assert not {s["spi"] for s in pcscf_states(link)} & {t.spi_pc, t.spi_ps, t.spi_uc, t.spi_us}
