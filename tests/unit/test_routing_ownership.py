"""MT requests reach the phone that owns the R-URI (issue 10, finding 2).

A request from the core names a contact URI. Before, the newest contact whose contact URI or
received address matched took it, whatever its AoR and state: one unauthenticated REGISTER
naming the victim's contact made every MT request to the victim fail (480), and a registered
subscriber naming it received the victim's requests through its own SAs. The C module
delivers to the victim in both cases. Here: through the routing script over the KSR double,
a real store and the fake kernel.
"""
from __future__ import annotations

from ipsec.sipuri import parse_uri
from scenario import (AOR, CORE, PCSCF, PORT_US, UE, challenge, register, reply_to, request,
                      server_param)

MALLORY = "10.0.0.3"
MALLORY_AOR = "sip:mallory@ims.example"
VICTIM_CONTACT = f"sip:alice@{UE}:5060"
MALLORY_OFFER = ("ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;spi-c=5555;spi-s=6666;"
                 "port-c=41000;port-s=41001")


def mt(pcscf, ruri=VICTIM_CONTACT, to=AOR):
    raw = request("INVITE", ruri, via=f"{CORE}:5060").replace(f"To: <{AOR}>", f"To: <{to}>")
    return pcscf.request(raw, source=(CORE, 5060, "udp"))


def dst(rec):
    (relay,) = rec.relays
    return relay.dst_uri, relay.send_socket


def test_a_pending_register_naming_the_victims_contact_does_not_take_its_requests(pcscf):
    """Before: 480 (the newest match, the attacker's pending contact, has no tunnel)."""
    victim = pcscf.registered()
    reg = register(aor=MALLORY_AOR, contact=VICTIM_CONTACT, via=f"{MALLORY}:5060",
                   security_client=MALLORY_OFFER)
    rec = pcscf.request(reg, source=(MALLORY, 5060, "udp"))
    rec = pcscf.register_reply(rec.relays[0], reply_to(reg, 401, "Unauthorized", (
        f"WWW-Authenticate: {challenge()}",)))
    assert rec.values("Security-Server"), rec.log_text()  # challenged: pending with SAs
    rec = mt(pcscf)
    assert rec.replies == [], rec.log_text()
    assert dst(rec) == (f"sip:{UE}:{PORT_US}", f"udp:{PCSCF}:{server_param(victim, 'port-c')}")


def test_a_registered_subscriber_naming_the_victims_contact_does_not_get_its_requests(pcscf):
    """Before: the victim's INVITE went to the attacker's address through its SAs."""
    victim = pcscf.registered()
    pcscf.registered(ue=MALLORY, aor=MALLORY_AOR, contact=VICTIM_CONTACT, offer=MALLORY_OFFER)
    rec = mt(pcscf)
    assert dst(rec) == (f"sip:{UE}:{PORT_US}", f"udp:{PCSCF}:{server_param(victim, 'port-c')}")


def test_the_subscriber_that_registered_that_contact_gets_its_own_requests(pcscf):
    """The S-CSCF sends the attacker's own requests to the contact it registered: the AoR
    says whose they are, and they go through the attacker's SAs, never the victim's."""
    pcscf.registered()
    mallory = pcscf.registered(ue=MALLORY, aor=MALLORY_AOR, contact=VICTIM_CONTACT,
                               offer=MALLORY_OFFER)
    rec = mt(pcscf, to=MALLORY_AOR)
    assert dst(rec) == (f"sip:{MALLORY}:41001",
                        f"udp:{PCSCF}:{server_param(mallory, 'port-c')}")


def test_a_contact_naming_another_address_is_not_reached_without_its_aor(pcscf):
    """Nobody registered at 10.0.0.2: a request for that address and another AoR finds no
    owner (before: the attacker's SAs)."""
    pcscf.registered(ue=MALLORY, aor=MALLORY_AOR, contact=VICTIM_CONTACT, offer=MALLORY_OFFER)
    rec = mt(pcscf)
    assert [r.code for r in rec.replies] == [480] and rec.relays == []


def test_a_pending_contact_never_takes_requests(pcscf):
    """A phone challenged but not yet registered has proved nothing."""
    reg = register()
    rec = pcscf.request(reg)
    pcscf.register_reply(rec.relays[0], reply_to(reg, 401, "Unauthorized", (
        f"WWW-Authenticate: {challenge()}",)))
    rec = mt(pcscf)
    assert [r.code for r in rec.replies] == [480] and rec.relays == []


def test_a_user_part_with_a_semicolon_is_not_the_host():
    """Before: `sip:+123;npdi@host` had host '+123' (split at ';' before '@')."""
    uri = parse_uri("sip:+4912345;npdi;rn=+49999@10.0.0.2:5070;user=phone")
    assert (uri.user, uri.host, uri.port) == ("+4912345;npdi;rn=+49999", "10.0.0.2", 5070)
    assert uri.params == {"user": "phone"}


def test_an_mt_request_with_a_number_portability_user_part_reaches_its_phone(pcscf):
    pcscf.registered(contact=f"sip:+4912345;npdi@{UE}:5060")
    rec = mt(pcscf, ruri=f"sip:+4912345;npdi@{UE}:5060")
    assert dst(rec)[0] == f"sip:{UE}:{PORT_US}"
