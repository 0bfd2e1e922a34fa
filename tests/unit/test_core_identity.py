"""The P-CSCF as a gateway (issue 10, findings 3 and 4), through the KSR double:

- who is the core: its own socket (CORE_IP/CORE_PORT) when set, never a source address on
  the phones' port; NEXT_HOP's addresses otherwise, an FQDN resolved at start;
- which identity the core is told: one registered through the SAs the request came by
  (24.229 5.2.6.3), never one the phone asserts itself; in-dialog requests from phones only
  to the core; integrity-protected on REGISTERs (24.229 5.2.2.1).
"""
from __future__ import annotations

import gc
import sys

import pytest

import KSR
from ipsec import identities
from kemi.core import Core, CoreError
from scenario import (AOR, CORE, OFFER, PCSCF, PORT_UC, PORT_US, UE, FakeKernel, Pcscf,
                      challenge, defines, listen_sockets, register, reply_to, request,
                      server_param)

CORE_PORT = 5070
CORE_SOCKETS = (f"udp:{PCSCF}:{CORE_PORT}", f"tcp:{PCSCF}:{CORE_PORT}")
ATTACKER = "10.0.0.66"
ASSOCIATED = ("P-Associated-URI: <sip:alice@ims.example>, \"Alice\" <tel:+1-555-0100>, "
              "<sip:alice.work@ims.example>")


def headers_of(relay, name: str) -> list[str]:
    return [body for n, body in relay.headers if n.lower() == name.lower()]


@pytest.fixture
def gw(tmp_path):
    """A P-CSCF whose core has its own socket: PCSCF_IP:5070."""
    p = Pcscf.start(str(tmp_path / "ipsec.sqlite"), CORE_IP=PCSCF, CORE_PORT=str(CORE_PORT))
    KSR._listen(*listen_sockets(p.module.params), *CORE_SOCKETS)
    yield p
    p.module.store.close()


def mt_message(source_port: int = 5060, via_host: str = CORE) -> str:
    return request("MESSAGE", f"sip:alice@{UE}:5060", via=f"{via_host}:{source_port}")


# -- finding 3: who is the core ----------------------------------------------------------------

def test_with_a_core_socket_a_request_from_the_cores_address_on_5060_is_refused(gw):
    """Before: any request on 5060 whose source IP was NEXT_HOP's went into the phone's SAs;
    a spoofed UDP source is all it took."""
    gw.registered()
    rec = gw.request(mt_message(), source=(CORE, 5060, "udp"), local=(PCSCF, 5060))
    assert [(r.code, r.reason) for r in rec.replies] == [(403, "Forbidden - Use Protected Port")]
    assert rec.relays == []


def test_with_a_core_socket_what_arrives_on_it_is_the_cores_whatever_its_source(gw):
    gw.registered()
    rec = gw.request(mt_message(via_host="10.0.0.30"), source=("10.0.0.30", 5060, "udp"),
                     local=(PCSCF, CORE_PORT))
    (relay,) = rec.relays
    assert (relay.dst_uri, relay.send_socket) == (f"sip:{UE}:{PORT_US}", f"udp:{PCSCF}:5100")
    ((phone_side, core_side),) = relay.record_route
    assert core_side == f"{PCSCF}:{CORE_PORT};r2=on"


def test_with_a_core_socket_registers_leave_from_it_and_path_names_it(gw):
    (relay,) = gw.request(register()).relays
    assert relay.send_socket == f"udp:{PCSCF}:{CORE_PORT}"
    assert headers_of(relay, "Path") == [f"<sip:{PCSCF}:{CORE_PORT};lr>"]
    assert relay.dst_uri == f"sip:{CORE}:5060"


def test_with_a_core_socket_a_phones_call_leaves_from_it(gw):
    server = gw.registered(ok_extra=(ASSOCIATED,))
    raw = request("INVITE", "sip:bob@ims.example", via=f"{UE}:{PORT_UC}",
                  extra=(f"Security-Verify: {server}",))
    (relay,) = gw.request(raw, source=(UE, PORT_UC, "udp"), local=(PCSCF, 5200)).relays
    assert relay.send_socket == f"udp:{PCSCF}:{CORE_PORT}"
    ((core_side, phone_side),) = relay.record_route
    assert core_side == f"{PCSCF}:{CORE_PORT};r2=on" and f"{PCSCF}:5200" in phone_side


def test_a_register_on_the_core_socket_is_refused(gw):
    rec = gw.request(register(), source=(CORE, 5060, "udp"), local=(PCSCF, CORE_PORT))
    assert [r.code for r in rec.replies] == [403] and rec.relays == []


def test_without_a_core_socket_an_fqdn_next_hop_is_resolved_at_start(tmp_path):
    """Before: the source address was compared with the FQDN's text: every core request
    was refused."""
    p = Pcscf.start(str(tmp_path / "s.sqlite"), NEXT_HOP='"sip:localhost:6060"')
    p.registered()
    rec = p.request(mt_message(via_host="127.0.0.1"), source=("127.0.0.1", 6060, "udp"))
    (relay,) = rec.relays
    assert relay.dst_uri == f"sip:{UE}:{PORT_US}"
    p.module.store.close()


def test_core_from_defines_rules():
    get = lambda d: lambda name: d.get(name)  # noqa: E731
    base = {"PCSCF_IP": PCSCF, "NEXT_HOP": '"sip:scscf.ims.example:6060"'}
    core = Core.from_defines(get(base), resolver=lambda host: frozenset({"10.0.0.9", "fd00::9"}))
    assert core.next_hop_hosts == {"scscf.ims.example", "10.0.0.9", "fd00::9"}
    assert core.socket_host is None and "10.0.0.9" in core.trust_line()
    assert "CORE_IP" in core.trust_line() and core.rr == f"{PCSCF}:5060;r2=on"

    def fails(host):
        raise OSError("Name or service not known")

    with pytest.raises(CoreError, match="does not resolve"):
        Core.from_defines(get(base), resolver=fails)
    # with a core socket nothing depends on the resolution: the name alone
    core = Core.from_defines(get({**base, "CORE_IP": "10.1.0.1"}), resolver=fails)
    assert core.socket_host == "10.1.0.1" and core.socket_port == 5060
    assert core.rr == "10.1.0.1:5060;r2=on" and "10.1.0.1:5060" in core.trust_line()
    with pytest.raises(CoreError, match="phones' socket"):
        Core.from_defines(get({**base, "CORE_IP": PCSCF}), resolver=fails)
    for bad in ("0", "70000", "50x"):
        with pytest.raises(CoreError, match="CORE_PORT"):
            Core.from_defines(get({**base, "CORE_IP": "10.1.0.1", "CORE_PORT": bad}))
    with pytest.raises(CoreError, match="NEXT_HOP"):
        Core.from_defines(get({**base, "NEXT_HOP": '"tel:+123"'}))


@pytest.fixture
def script(tmp_path, mocker):
    mocker.patch("ipsec.module.Xfrm", return_value=FakeKernel())
    KSR._reset()
    sys.modules.pop("kemi.pcscf", None)
    import kemi.pcscf as pcscf_script
    return pcscf_script


def test_start_says_once_what_it_trusts(script, tmp_path):
    KSR._defines(defines(str(tmp_path / "a.sqlite")))
    assert script.mod_init() is not None
    (line,) = [l for l in KSR._rec.logs["info"] if "trusted as the core's" in l]
    assert CORE in line and "spoofed" in line and "CORE_IP" in line
    KSR._reset()
    KSR._defines(defines(str(tmp_path / "b.sqlite"), CORE_IP="10.1.0.1", CORE_PORT="5070"))
    assert script.mod_init() is not None
    assert [l for l in KSR._rec.logs["info"] if "core socket 10.1.0.1:5070" in l]


def test_start_refuses_a_next_hop_that_cannot_tell_the_core_apart(script, tmp_path):
    KSR._defines(defines(str(tmp_path / "a.sqlite"), NEXT_HOP='"sip:no-such-host.invalid"'))
    assert script.mod_init() is None
    (line,) = KSR._rec.logs["err"]
    assert "refusing to start" in line and "no-such-host.invalid" in line


# -- finding 4: identity -----------------------------------------------------------------------

def protected_invite(p, server: str, *extra: str, to_tag: str | None = None):
    raw = request("INVITE", "sip:bob@ims.example", via=f"{UE}:{PORT_UC}", to_tag=to_tag,
                  extra=(f"Security-Verify: {server}", *extra))
    return p.request(raw, source=(UE, PORT_UC, "udp"), local=(PCSCF, 5200))


def test_the_200_oks_identities_are_kept_with_the_contact(pcscf):
    pcscf.registered(ok_extra=(ASSOCIATED, f"Service-Route: <sip:orig@10.0.0.30:6060;lr>"))
    (c,) = pcscf.module.store.find_by_aor(AOR)
    assert c.associated == ("sip:alice@ims.example", "tel:+1-555-0100",
                            "sip:alice.work@ims.example")
    assert c.service_route == ("sip:orig@10.0.0.30:6060;lr",)


def test_a_protected_request_asserts_the_default_identity(pcscf):
    """Before: no P-Asserted-Identity was inserted (24.229 5.2.6.3)."""
    server = pcscf.registered(ok_extra=(ASSOCIATED,))
    (relay,) = protected_invite(pcscf, server).relays
    assert headers_of(relay, "P-Asserted-Identity") == ["<sip:alice@ims.example>"]


def test_a_registered_preferred_identity_is_asserted_and_removed(pcscf):
    server = pcscf.registered(ok_extra=(ASSOCIATED,))
    (relay,) = protected_invite(pcscf, server, "P-Preferred-Identity: <tel:+15550100>").relays
    assert headers_of(relay, "P-Asserted-Identity") == ["<tel:+1-555-0100>"]
    assert headers_of(relay, "P-Preferred-Identity") == []


def test_an_unregistered_preferred_identity_gets_the_default(pcscf):
    server = pcscf.registered(ok_extra=(ASSOCIATED,))
    (relay,) = protected_invite(pcscf, server,
                                "P-Preferred-Identity: <sip:ceo@ims.example>").relays
    assert headers_of(relay, "P-Asserted-Identity") == ["<sip:alice@ims.example>"]
    assert headers_of(relay, "P-Preferred-Identity") == []


def test_a_phones_own_asserted_identity_never_reaches_the_core(pcscf):
    """Before: relayed unchanged, and the core trusts P-Asserted-Identity from the P-CSCF."""
    server = pcscf.registered(ok_extra=(ASSOCIATED,))
    (relay,) = protected_invite(pcscf, server, "P-Asserted-Identity: <sip:ceo@ims.example>",
                                "P-Asserted-Identity: <tel:+999>").relays
    assert headers_of(relay, "P-Asserted-Identity") == ["<sip:alice@ims.example>"]


def test_without_p_associated_uri_the_aor_is_asserted(pcscf):
    server = pcscf.registered()
    (relay,) = protected_invite(pcscf, server, "P-Asserted-Identity: <sip:ceo@ims.example>").relays
    assert headers_of(relay, "P-Asserted-Identity") == [f"<{AOR}>"]


def test_a_request_through_sas_not_yet_registered_is_refused(pcscf):
    """After the 401 the phone has SAs, but nothing is registered through them until the
    200 OK: no identity to assert. Before: relayed to the core."""
    raw = register()
    (relay,) = pcscf.request(raw).relays
    rec = pcscf.register_reply(relay, reply_to(raw, 401, "Unauthorized",
                                               (f"WWW-Authenticate: {challenge()}",)))
    (server,) = rec.values("Security-Server")
    rec = protected_invite(pcscf, server)
    assert [(r.code, r.reason) for r in rec.replies] == [(403, "Forbidden - Not Registered")]
    assert rec.relays == [] and "no identity registered" in rec.log_text()


# -- finding 4: in-dialog routes ---------------------------------------------------------------

@pytest.mark.parametrize("route", ["<sip:evil.example.com;lr>",
                                   f"<sip:{PCSCF}:5200;lr;r2=on>, <sip:{ATTACKER}:5060;lr>"])
def test_an_in_dialog_request_routed_elsewhere_is_refused(pcscf, route):
    """Before: relayed wherever its Route said, from our trusted address (an open relay)."""
    server = pcscf.registered(ok_extra=(ASSOCIATED,))
    rec = protected_invite(pcscf, server, f"Route: {route}", to_tag="t1")
    assert [(r.code, r.reason) for r in rec.replies] == [(403, "Forbidden - Route Not Allowed")]
    assert rec.relays == [] and "not the core" in rec.log_text()


def test_an_in_dialog_request_to_the_s_cscf_of_the_service_route_is_relayed(pcscf):
    server = pcscf.registered(ok_extra=(ASSOCIATED, "Service-Route: <sip:orig@10.0.0.30:6060;lr>"))
    route = f"Route: <sip:{PCSCF}:5200;lr;r2=on>, <sip:{PCSCF}:5060;lr;r2=on>, <sip:10.0.0.30:6060;lr>"
    (relay,) = protected_invite(pcscf, server, route, to_tag="t1").relays
    assert relay.dst_uri == "sip:10.0.0.30:6060;lr"


def test_an_in_dialog_request_on_the_core_socket_leaves_from_it(gw):
    server = gw.registered(ok_extra=(ASSOCIATED,))
    route = (f"Route: <sip:{PCSCF}:5200;lr;r2=on>, <sip:{PCSCF}:{CORE_PORT};lr;r2=on>, "
             f"<sip:{CORE}:5060;lr>")
    (relay,) = protected_invite(gw, server, route, to_tag="t1").relays
    assert (relay.dst_uri, relay.send_socket) == (f"sip:{CORE}:5060;lr", f"udp:{PCSCF}:{CORE_PORT}")


# -- finding 4: integrity-protected ------------------------------------------------------------

AUTH = ('Authorization: Digest username="alice@ims.example", realm="ims.example", '
        'uri="sip:ims.example", nonce="", response="", integrity-protected="yes"')


def test_an_unprotected_register_is_marked_not_integrity_protected(pcscf):
    """Before: the phone's integrity-protected="yes" reached the S-CSCF unchanged."""
    (relay,) = pcscf.request(register(extra=(AUTH,))).relays
    (auth,) = headers_of(relay, "Authorization")
    assert auth.count("integrity-protected") == 1 and auth.endswith('integrity-protected="no"')
    assert 'username="alice@ims.example"' in auth and 'nonce=""' in auth


def test_a_protected_register_is_marked_integrity_protected(pcscf):
    server = pcscf.registered()
    raw = register(security_verify=server, via=f"{UE}:{PORT_UC}", cseq=5,
                   extra=(AUTH.replace('"yes"', '"no"'),))
    rec = pcscf.request(raw, source=(UE, PORT_UC, "udp"),
                        local=(PCSCF, int(server_param(server, "port-s"))))
    (auth,) = headers_of(rec.relays[0], "Authorization")
    assert auth.count("integrity-protected") == 1 and auth.endswith('integrity-protected="yes"')


def test_a_register_without_authorization_gets_none(pcscf):
    (relay,) = pcscf.request(register()).relays
    assert headers_of(relay, "Authorization") == []


# -- the pure rules (ipsec/identities.py) ------------------------------------------------------

@pytest.mark.parametrize("a, b, same", [
    ("sip:alice@IMS.example", "<sip:alice@ims.example;user=phone>", True),
    ("sip:alice@ims.example:5060", "sip:alice@ims.example", True),
    ("sip:Alice@ims.example", "sip:alice@ims.example", False),
    ("tel:+1-555-0100", "tel:+15550100;phone-context=x", True),
    ("tel:+15550100", "sip:+15550100@ims.example", False),
    ("sips:alice@ims.example", "sip:alice@ims.example", False),
])
def test_identity_keys(a, b, same):
    assert (identities.identity_key(a) == identities.identity_key(b)) is same


def test_asserted_identity_rules():
    reg = ("sip:a@x", "tel:+1")
    assert identities.asserted_identity(reg, None) == "sip:a@x"
    assert identities.asserted_identity(reg, "<sip:z@x>, <tel:+1>") == "tel:+1"
    assert identities.asserted_identity(reg, "garbage <") == "sip:a@x"
    assert identities.asserted_identity((), "<sip:a@x>") is None


@pytest.mark.parametrize("value, want", [
    ('Digest username="u", nonce=""', 'Digest username="u", nonce="", integrity-protected="no"'),
    ('Digest integrity-protected="yes", username="u"', 'Digest username="u", integrity-protected="no"'),
    ('Digest username="a, integrity-protected=yes", integrity-protected=yes',
     'Digest username="a, integrity-protected=yes", integrity-protected="no"'),
    ('Digest username="u",integrity-protected="tls-yes" ,realm="r"',
     'Digest username="u",realm="r", integrity-protected="no"'),
])
def test_integrity_protected_is_set_once(value, want):
    assert identities.with_integrity_protected(value, "no") == want


def test_registered_identities_default_to_the_aor():
    assert identities.registered(None, "<sip:alice@ims.example>;tag=1") == ("sip:alice@ims.example",)
    assert identities.registered("<sip:b@x>", "<sip:alice@ims.example>") == ("sip:b@x",)


def test_start_leaves_what_it_built_out_of_the_forked_workers_collections(script, tmp_path):
    """Objects built before the fork stay shared with the workers: a child's cyclic GC must
    not walk (and so copy) them (kemi.workers.freeze_for_fork)."""
    gc.unfreeze()
    KSR._defines(defines(str(tmp_path / "a.sqlite")))
    callbacks = script.mod_init()
    assert gc.get_freeze_count() > 0
    tracked = {id(o) for o in gc.get_objects()}
    assert id(callbacks) not in tracked and id(callbacks.r) not in tracked
