"""Replies that match no transaction (issue 10, finding 5), through kemi/pcscf.py's reply route.

Kamailio forwards such a reply statelessly along its Via after the reply route returns. Before,
the reply route did nothing: a late 401 from the S-CSCF (its REGISTER's transaction gone after
fr_timer or a restart) reached the phone with ck= and ik= in clear text.
"""
from __future__ import annotations

import pytest

import KSR
from scenario import (CLIENT_PORT, CORE, PCSCF, PORT_UC, PORT_US, SERVER_PORT, UE, challenge,
                      register, reply_to, request)


@pytest.fixture
def app(pcscf):
    import kemi.pcscf
    return kemi.pcscf.kamailio(pcscf.routing)


def arrives(raw_reply: str, request_raw: str, in_transaction: bool):
    return KSR._load_reply(raw_reply, request_raw, source=(CORE, 5060, "udp"),
                           in_transaction=in_transaction)


def test_a_late_401_with_keys_is_dropped_never_forwarded(app):
    reg = register()
    rec = arrives(reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge()}",)),
                  reg, in_transaction=False)
    assert app.ksr_reply_route(None) == 0
    assert rec.dropped and "matches no transaction: dropped" in rec.log_text()
    assert "CK/IK" in rec.log_text() and "0123456789abcdef" not in rec.log_text()


@pytest.mark.parametrize("code", [200, 403, 500])
def test_any_stray_reply_to_register_is_dropped(app, code):
    reg = register()
    rec = arrives(reply_to(reg, code, "Whatever"), reg, in_transaction=False)
    app.ksr_reply_route(None)
    assert rec.dropped


@pytest.mark.parametrize("header", ["WWW-Authenticate", "Proxy-Authenticate"])
def test_a_stray_challenge_of_another_method_with_keys_is_dropped(app, header):
    inv = request("INVITE", "sip:bob@ims.example", via=f"{UE}:5060")
    rec = arrives(reply_to(inv, 407, "Proxy Authentication Required",
                           (f"{header}: {challenge()}",)), inv, in_transaction=False)
    app.ksr_reply_route(None)
    assert rec.dropped


def ours(raw_reply: str, port: int = 5060) -> str:
    """The reply as the next hop sends it back to us: our Via on top of the request's."""
    return raw_reply.replace(
        "\r\nVia: ", f"\r\nVia: SIP/2.0/UDP {PCSCF}:{port};branch=z9hG4bKpcscf\r\nVia: ", 1)


@pytest.mark.parametrize(("via", "socket"), [
    (f"{UE}:{PORT_US};rport={PORT_US}", f"udp:{PCSCF}:{CLIENT_PORT}"),  # SA3: port_pc -> port_us
    (f"{UE}:{PORT_US}", f"udp:{PCSCF}:{CLIENT_PORT}"),
    (f"{UE}:{PORT_UC}", f"udp:{PCSCF}:{SERVER_PORT}"),  # SA2: port_ps -> port_uc
    (f"192.0.2.7:5060;received={UE};rport={PORT_US}", f"udp:{PCSCF}:{CLIENT_PORT}"),
])
def test_a_2xx_from_the_core_after_its_transaction_goes_to_the_phone_through_its_sas(
        app, pcscf, via, socket):
    """A 2xx to an INVITE retransmitted after its transaction ended must still reach the
    caller, through its SAs. Before, the core forwarded it from the socket it came to (5060),
    in cleartext to the phone's protected port."""
    pcscf.registered()
    inv = request("INVITE", "sip:bob@ims.example", via=via)
    rec = arrives(ours(reply_to(inv, 200, "OK")), inv, in_transaction=False)
    assert app.ksr_reply_route(None) == 1 and not rec.dropped, rec.log_text()
    assert rec.send_socket == socket


def test_a_2xx_from_the_core_to_our_protected_port_goes_to_the_phone_too(app, pcscf):
    """With one socket, the phone's INVITE left for the core from the protected port it came
    to (our Via names it), so the core's late 2xx comes back there (seen on real Kamailio)."""
    pcscf.registered()
    inv = request("INVITE", "sip:bob@ims.example", via=f"{UE}:{PORT_US};rport={PORT_US}")
    rec = KSR._load_reply(ours(reply_to(inv, 200, "OK"), SERVER_PORT), inv,
                          source=(CORE, 5060, "udp"), local=(PCSCF, SERVER_PORT),
                          in_transaction=False)
    assert app.ksr_reply_route(None) == 1 and not rec.dropped, rec.log_text()
    assert rec.send_socket == f"udp:{PCSCF}:{CLIENT_PORT}"


@pytest.mark.parametrize("via", [f"{UE}:5060", f"{UE}:{PORT_US}", "10.0.0.77:31001"])
def test_a_stray_reply_from_the_core_to_no_phones_protected_port_is_dropped(app, pcscf, via):
    if via != f"{UE}:{PORT_US}":
        pcscf.registered()  # else: no phone is registered at all
    inv = request("INVITE", "sip:bob@ims.example", via=via)
    rec = arrives(ours(reply_to(inv, 200, "OK")), inv, in_transaction=False)
    assert app.ksr_reply_route(None) == 0 and rec.dropped
    assert "is no phone's protected port" in rec.log_text()


def through_sas(raw_reply: str, request_raw: str):
    """A reply from the phone's port_us to our port_pc (SA4), matching no transaction."""
    return KSR._load_reply(raw_reply, request_raw, source=(UE, PORT_US, "udp"),
                           local=(PCSCF, CLIENT_PORT), in_transaction=False)


def test_a_phones_stray_reply_goes_to_the_core(app, pcscf):
    pcscf.registered()
    inv = request("INVITE", f"sip:alice@{UE}:5060", via=f"{CORE}:5060")
    rec = through_sas(ours(reply_to(inv, 200, "OK"), CLIENT_PORT), inv)
    assert app.ksr_reply_route(None) == 1 and not rec.dropped


@pytest.mark.parametrize("via", [f"10.0.0.77:{PORT_US}", f"{UE}:{PORT_UC}", f"{PCSCF}:5060"])
def test_a_phones_stray_reply_aimed_anywhere_but_the_core_is_dropped(app, pcscf, via):
    """Forwarded along its Via from our port_pc, a phone's response aimed at another phone's
    port_us would be protected by that phone's SAs (the port pairs are shared): one phone
    could write into another's protected channel."""
    pcscf.registered()
    inv = request("INVITE", f"sip:alice@{UE}:5060", via=via)
    rec = through_sas(ours(reply_to(inv, 200, "OK"), CLIENT_PORT), inv)
    assert app.ksr_reply_route(None) == 0 and rec.dropped
    assert "is not the core" in rec.log_text()


def test_replies_of_a_transaction_are_left_to_tm(app):
    """The 401 of a live transaction goes to ksr_register_reply (ipsec_create strips the keys)."""
    reg = register()
    rec = arrives(reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge()}",)),
                  reg, in_transaction=True)
    assert app.ksr_reply_route(None) == 1 and not rec.dropped


@pytest.mark.parametrize("code,header", [(200, "WWW-Authenticate"), (401, "Proxy-Authenticate"),
                                         (407, "Proxy-Authenticate"), (403, "WWW-Authenticate")])
def test_keys_in_any_other_challenge_of_a_transaction_are_removed(app, code, header):
    """Found by tests/fuzz_sip.py: a 200 OK to REGISTER carrying a WWW-Authenticate with
    ck/ik was forwarded as it came (only a 401's WWW-Authenticate went through ipsec_create)."""
    reg = register()
    rec = arrives(reply_to(reg, code, "Whatever", (f"{header}: {challenge()}",)), reg,
                  in_transaction=True)
    assert app.ksr_reply_route(None) == 1 and not rec.dropped
    assert rec.values(header) == [] and "with CK/IK removed" in rec.log_text()


def test_the_401_to_register_keeps_its_keys_for_ipsec_create(app):
    reg = register()
    rec = arrives(reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge()}",)),
                  reg, in_transaction=True)
    app.ksr_reply_route(None)
    assert rec.values("WWW-Authenticate") == [challenge()]


def test_a_stray_reply_from_a_stranger_is_dropped_not_forwarded_along_its_via(app):
    """A sender on a phone's address writes a response to one of our protected ports, its
    second Via naming the phone's protected client port: forwarded along it, from our port,
    it went to the phone in cleartext (port_pc -> port_uc: no SA pairs them; seen in
    test_hostile.py's flood). A reply matching no transaction goes on only from the core or
    through a phone's SAs."""
    msg = request("MESSAGE", "sip:bob@ims.example", via=f"{UE}:41410")
    rec = KSR._load_reply(ours(reply_to(msg, 200, "OK")), msg, source=(UE, 44817, "udp"),
                          in_transaction=False)
    assert app.ksr_reply_route(None) == 0 and rec.dropped
    assert "neither from the core nor through a phone's SAs" in rec.log_text()


@pytest.mark.parametrize(("source", "goes"), [
    ((UE, PORT_US, "udp"), True),  # the phone, through SA4
    ((CORE, 5060, "udp"), True),  # the core (a phone's request through SA4, relayed from port_pc)
    ((UE, 44817, "udp"), False),  # a stranger on the phone's address
    (("10.0.0.66", PORT_US, "udp"), False),
])
def test_a_reply_to_a_request_sent_to_a_phone_must_come_through_its_sas(app, pcscf, source,
                                                                        goes):
    """TM matches a reply by its branch, whoever sends it: a stranger that read an MT INVITE
    (ealg=null) could answer it in cleartext to our port_pc and end the call."""
    pcscf.registered()
    inv = request("INVITE", f"sip:alice@{UE}:{PORT_US}", via=f"{CORE}:5060")
    rec = KSR._load_reply(ours(reply_to(inv, 486, "Busy Here"), CLIENT_PORT), inv,
                          source=source, local=(PCSCF, CLIENT_PORT), in_transaction=True)
    assert app.ksr_reply_route(None) == (1 if goes else 0)
    assert rec.dropped != goes
    assert ("not through a phone's SAs" in rec.log_text()) != goes


@pytest.mark.parametrize(("source", "goes"), [
    ((UE, PORT_UC, "udp"), True),  # the phone, through SA1 (a TCP-style reply path)
    ((CORE, 5060, "udp"), True),  # the core: NEXT_HOP
    (("10.0.0.50", 5060, "udp"), True),  # another core node (a Service-Route host)
    ((UE, 44817, "udp"), False),  # a stranger on a phone's address
])
def test_a_reply_at_a_protected_server_port_from_a_phones_address_must_come_through_its_sas(
        app, pcscf, source, goes):
    """With one socket a phone's INVITE leaves for the core from our port_ps, and the core's
    replies come back there; a sender on a phone's address is refused there too."""
    pcscf.registered()
    inv = request("INVITE", "sip:bob@ims.example", via=f"{UE}:{PORT_US};rport={PORT_US}")
    rec = KSR._load_reply(ours(reply_to(inv, 486, "Busy Here"), SERVER_PORT), inv,
                          source=source, local=(PCSCF, SERVER_PORT), in_transaction=True)
    assert app.ksr_reply_route(None) == (1 if goes else 0)
    assert rec.dropped != goes
    assert ("from a phone's address, not through its SAs" in rec.log_text()) != goes
