"""End to end, real Kamailio + real ESP: the P-CSCF as a gateway (issue 10, findings 3, 4).

Kamailio runs with a core socket (CORE_IP = the P-CSCF's address, CORE_PORT 5070): the S-CSCF
stub sends its requests there and the P-CSCF sends the core's there from. A request on port
5060 whose source is the core's own address and port (another socket bound to the stub's
10.77.0.1:6060, as a spoofed UDP datagram would look to Kamailio) must not reach the phone.
Requests from the phone reach the core with the identity the core registered, and in-dialog
requests from the phone go nowhere but the core.
"""
from __future__ import annotations

import re
import socket
import time

import pytest

from checks import through_esp
from esp_net import ADDRS
from pcscf_net import SCSCF_PORT, Kamailio, Phone, _socket, mt_call, pcscf_counters
from sip import Msg, hostport, parse, token, uri_of, via_sent_by

CORE_PORT = 5070
PC, UE = ADDRS[4]


@pytest.fixture(scope="module")
def kamailio(link, scscf, tmp_path_factory):
    k = Kamailio(link, tmp_path_factory.mktemp("kamailio-core"), CORE_IP=PC,
                 CORE_PORT=str(CORE_PORT))
    k.start()
    scscf.pcscf_port = CORE_PORT
    yield k
    k.stop_and_check()  # the state invariant, then Python errors


def _registered(link, scscf, user: str) -> Phone:
    phone = Phone(link, scscf, user=user)
    phone.full_registration()
    return phone


def _seen_since(scscf, n: int, method: str) -> list[Msg]:
    return [m for m in scscf.seen[n:] if m.is_request and m.method == method]


def test_registers_leave_from_the_core_socket_marked_by_protection(link, scscf, kamailio):
    """Path and Via name the core socket (the core's requests come back to it); the first
    REGISTER says integrity-protected="no", the one through the SAs "yes" (24.229 5.2.2)."""
    assert "core socket 10.77.0.1:5070" in kamailio.log()
    n = len(scscf.seen)
    phone = Phone(link, scscf, user="gw-reg")
    with through_esp(phone, "sa1", "sa3"):
        phone.full_registration()
    by_cseq = {m.get("CSeq"): m for m in _seen_since(scscf, n, "REGISTER") if "gw-reg" in m.get("To")}
    first, second = (by_cseq[c] for c in sorted(by_cseq, key=lambda c: int(c.split()[0])))
    for reg, mark in ((first, "no"), (second, "yes")):
        assert via_sent_by(reg.get("Via")) == (PC, CORE_PORT)
        assert f"{PC}:{CORE_PORT}" in reg.get("Path")
        auth = reg.get("Authorization")
        assert re.findall(r'integrity-protected="?([a-z-]+)', auth) == [mark], auth
    with through_esp(phone, "sa3", "sa4"):
        mt_call(phone, scscf)  # the stub follows the Path: into the core socket


def _spoof(link, method: str, phone: Phone) -> Msg:
    """A request to the phone's registered contact from the core's address AND port, on 5060."""
    s = _socket(link.pc, 4, socket.SOCK_DGRAM)  # SO_REUSEADDR: beside the stub's socket
    s.bind((PC, SCSCF_PORT))
    try:
        m = Msg(f"{method} {phone.contact_uri(phone.tunnel.port_us)} SIP/2.0")
        m.add("Via", f"SIP/2.0/UDP {PC}:{SCSCF_PORT};branch=z9hG4bK{token()}")
        m.add("Max-Forwards", "70")
        m.add("From", "<sip:fraud@ims.test>;tag=f1")
        m.add("To", f"<{phone.aor}>")
        m.add("Call-ID", token())
        m.add("CSeq", f"1 {method}")
        m.add("Contact", f"<sip:fraud@{PC}:{SCSCF_PORT}>")
        m.add("P-Asserted-Identity", "<sip:bank@ims.test>")
        s.sendto(m.encode(), (PC, 5060))
        return m
    finally:
        s.close()


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_a_spoofed_request_from_the_cores_address_never_reaches_the_phone(link, scscf, kamailio,
                                                                         method):
    """Before: a request on 5060 from NEXT_HOP's address was the core's, from any port: it
    went into the victim's SAs (SA3) and reached the phone."""
    victim = _registered(link, scscf, f"victim-{method.lower()}")
    sa3 = victim.tunnel.spi_us
    before = pcscf_counters(link).get(sa3, 0)
    m = _spoof(link, method, victim)
    got = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        got += [x for x, _, _ in victim._poll(0.1) if x.is_request]
    assert got == [], f"the phone received {[x.first for x in got]}"
    assert pcscf_counters(link).get(sa3, 0) == before, "SA3 carried the spoofed request"
    log = kamailio.log()
    assert re.search(rf"{method} from {PC} refused: not protected and not from the core", log)
    assert m.get("Call-ID")  # sent
    # the core's real requests, on the core socket, still reach the victim
    with through_esp(victim, "sa3", "sa4"):
        mt_call(victim, scscf)


def test_the_core_is_told_a_registered_identity_not_the_phones(link, scscf, kamailio):
    """24.229 5.2.6.3: P-Preferred-Identity honoured when registered, then removed; the
    phone's own P-Asserted-Identity never reaches the core. Before: both went through."""
    scscf.associated = ["sip:gw-id@ims.test", "tel:+15550100"]
    try:
        phone = _registered(link, scscf, "gw-id")
    finally:
        scscf.associated = []
    for preferred, asserted in (("<tel:+1-555-0100>", "<tel:+15550100>"),
                                ("<sip:ceo@ims.test>", "<sip:gw-id@ims.test>"),
                                (None, "<sip:gw-id@ims.test>")):
        n = len(scscf.seen)
        m = phone._request("MESSAGE", "sip:bob@ims.test", phone.tunnel.port_us)
        for name, value in (("To", "<sip:bob@ims.test>"), ("Call-ID", token()),
                            ("CSeq", f"{phone.cseq} MESSAGE"),
                            ("Security-Verify", phone.security_server),
                            ("P-Asserted-Identity", "<sip:ceo@ims.test>")):
            m.add(name, value)
        if preferred:
            m.add("P-Preferred-Identity", preferred)
        phone.send_protected(m)
        phone.wait_reply(200, "MESSAGE")
        (got,) = _seen_since(scscf, n, "MESSAGE")
        assert got.all("P-Asserted-Identity") == [asserted], got.headers
        assert got.all("P-Preferred-Identity") == []
        assert via_sent_by(got.get("Via")) == (PC, CORE_PORT)


def test_an_in_dialog_request_to_elsewhere_is_refused(link, scscf, kamailio):
    """Before: `Route: <sip:anywhere;lr>` with a To tag was relayed there, from the P-CSCF."""
    phone = _registered(link, scscf, "gw-relay")
    target = _socket(link.ue, 4, socket.SOCK_DGRAM)
    target.bind((UE, 0))
    target.settimeout(2.0)
    port = target.getsockname()[1]
    try:
        m = phone._request("BYE", f"sip:someone@{hostport(UE, port)}", phone.tunnel.port_us)
        for name, value in (("Route", f"<sip:{hostport(UE, port)};lr>"),
                            ("To", "<sip:someone@ims.test>;tag=t9"), ("Call-ID", token()),
                            ("CSeq", f"{phone.cseq} BYE"),
                            ("Security-Verify", phone.security_server)):
            m.add(name, value)
        phone.send_protected(m)
        r, _, _ = phone.wait_reply(403, "BYE")
        assert r.first.endswith("Route Not Allowed")
        with pytest.raises(socket.timeout):
            target.recvfrom(65535)
    finally:
        target.close()
