"""ipsec_forward and every one of its flags, over the KSR double, a fake kernel, a real store.

Requests from the core to a registered phone must leave from our client port to the phone's
server port (SA3); replies to a phone's request must go back through an SA pair. Each test
checks where the message would go: destination URI, send socket, reply socket and target.
"""
from __future__ import annotations

import pytest

import KSR
from ipsec import module as m
from kemi.message import KsrMessage
from scenario import (AOR, CORE, DOMAIN, OFFER, PCSCF, PORT_UC, PORT_US, UE, Pcscf, register,
                      reply_to, request, server_param)

CLIENT = f"udp:{PCSCF}:5100"  # port_pc of the first lease
SERVER = f"udp:{PCSCF}:5200"  # port_ps


def mt(p: Pcscf, ruri: str = f"sip:alice@{UE}:5060", flags: int = 0, **load) -> int:
    """A request from the core for the phone: ipsec_forward on it."""
    KSR._load_request(request("INVITE", ruri, via=f"{CORE}:5060"), (CORE, 5060, "udp"),
                      (PCSCF, 5060), **load)
    return p.module.ipsec_forward(KsrMessage(), DOMAIN, flags)


def mo(p: Pcscf, server: str, *, via_port: int = PORT_UC, proto: str = "udp", flags: int = 0) -> int:
    """A request from the phone through SA1 (port_uc -> port_ps): ipsec_forward on it."""
    KSR._load_request(request("INVITE", "sip:bob@ims.example", via=f"{UE}:{via_port}"),
                      (UE, PORT_UC, proto), (PCSCF, int(server_param(server, "port-s"))))
    return p.module.ipsec_forward(KsrMessage(), DOMAIN, flags)


def where() -> tuple[str | None, str | None]:
    return KSR.pv.get("$du"), KSR._rec.send_socket


# -- requests to the phone -----------------------------------------------------------------------

def test_request_goes_from_port_pc_to_port_us(pcscf):
    pcscf.registered()
    assert mt(pcscf) == 1
    assert where() == (f"sip:{UE}:{PORT_US}", CLIENT)


def test_request_for_an_unknown_phone_fails_and_changes_nothing(pcscf):
    pcscf.registered()
    assert mt(pcscf, "sip:carol@10.0.0.66:5060") == -1
    assert where() == (None, None) and "no tunnel" in "".join(KSR._rec.logs["err"])


def test_flag_0x01_force_socket_is_always_on(pcscf):
    """Without a forced socket the request would leave from 5060, outside every SA: the
    module always sets it, so 0x01 changes nothing."""
    pcscf.registered()
    assert mt(pcscf, flags=0) == 1
    without = where()
    assert mt(pcscf, flags=m.FORCE_SOCKET) == 1
    assert where() == without == (f"sip:{UE}:{PORT_US}", CLIENT)


def test_flag_0x02_reverse_search_takes_the_oldest_contact(pcscf):
    """Two registrations answer the same contact URI: newest first, or oldest with 0x02
    (neither of the request's AoR, which would come first)."""
    pcscf.registered(aor="sip:alice-home@ims.example")
    second = OFFER.replace("31000", "32000").replace("31001", "32001") \
        .replace("1111", "3333").replace("2222", "4444")
    pcscf.registered(offer=second, aor="sip:alice-work@ims.example")
    assert mt(pcscf) == 1
    assert where() == (f"sip:{UE}:32001", f"udp:{PCSCF}:5101")
    assert mt(pcscf, flags=m.REVERSE_SEARCH) == 1
    assert where() == (f"sip:{UE}:{PORT_US}", CLIENT)


def test_flag_0x04_searches_by_the_destination_uri(pcscf):
    pcscf.registered()
    assert mt(pcscf, AOR, dst_uri=f"sip:{UE}:5060") == -1
    assert mt(pcscf, AOR, flags=m.USE_DST_URI, dst_uri=f"sip:{UE}:5060") == 1
    assert where() == (f"sip:{UE}:{PORT_US}", CLIENT)


def test_flag_0x08_searches_by_the_new_request_uri(pcscf):
    pcscf.registered()
    assert mt(pcscf, AOR, new_ruri=f"sip:alice@{UE}:5060") == -1
    assert mt(pcscf, AOR, flags=m.USE_NEW_RURI, new_ruri=f"sip:alice@{UE}:5060") == 1
    assert where() == (f"sip:{UE}:{PORT_US}", CLIENT)


def test_flag_0x10_ignores_the_alias_parameter(pcscf):
    """alias=ip~port~proto is where Kamailio received the phone (NAT); 0x10 ignores it."""
    pcscf.registered()
    aliased = f"sip:alice@198.51.100.7:5060;alias={UE}~5060~1"
    assert mt(pcscf, aliased) == 1
    assert where() == (f"sip:{UE}:{PORT_US}", CLIENT)
    assert mt(pcscf, aliased, flags=m.NO_ALIAS) == -1
    assert where() == (None, None)


def test_flag_0x20_keeps_the_destination_uri(pcscf):
    pcscf.registered()
    preset = f"sip:{UE}:{PORT_US};x=1"
    assert mt(pcscf, dst_uri=preset) == 1
    assert where() == (f"sip:{UE}:{PORT_US}", CLIENT)
    assert mt(pcscf, dst_uri=preset, flags=m.KEEP_DST_URI) == 1
    assert where() == (preset, CLIENT)
    assert mt(pcscf, flags=m.KEEP_DST_URI) == 1  # nothing to keep: set as usual
    assert where() == (f"sip:{UE}:{PORT_US}", CLIENT)


def test_flag_0x40_tcp_targets_the_client_port_from_our_server_port(pcscf):
    pcscf.registered(proto="tcp")
    assert mt(pcscf) == 1
    assert where() == (f"sip:{UE}:{PORT_US};transport=tcp", f"tcp:{PCSCF}:5100")
    assert mt(pcscf, flags=m.TCP_USE_CLIENT_PORT) == 1
    assert where() == (f"sip:{UE}:{PORT_UC};transport=tcp", f"tcp:{PCSCF}:5200")


def test_flag_0x40_does_not_touch_udp(pcscf):
    pcscf.registered()
    assert mt(pcscf, flags=m.TCP_USE_CLIENT_PORT) == 1
    assert where() == (f"sip:{UE}:{PORT_US}", CLIENT)


@pytest.mark.parametrize("flags", [0, m.DST_URI_TRANSPORT])
def test_flag_0x80_transport_is_always_in_the_destination_for_tcp(pcscf, flags):
    pcscf.registered(proto="tcp")
    assert mt(pcscf, flags=flags) == 1
    assert KSR.pv.get("$du").endswith(";transport=tcp")


def test_flag_0x80_udp_destination_has_no_transport(pcscf):
    pcscf.registered()
    assert mt(pcscf, flags=m.DST_URI_TRANSPORT) == 1
    assert "transport" not in KSR.pv.get("$du")


def test_flag_0x100_request_protocol_from_the_next_hop_uri(pcscf):
    pcscf.registered()
    hop = f"sip:alice@{UE}:5060;transport=tcp"
    assert mt(pcscf, dst_uri=hop) == 1
    assert where() == (f"sip:{UE}:{PORT_US}", CLIENT)
    assert mt(pcscf, dst_uri=hop, flags=m.USE_VIA) == 1
    assert where() == (f"sip:{UE}:{PORT_US};transport=tcp", f"tcp:{PCSCF}:5100")


def test_flag_0x200_udp_and_tcp_protected_sockets_both_exist(pcscf):
    """With our kamailio.cfg every protected port is bound for UDP and TCP, so the UDP
    socket never lacks and no fallback is needed: Kamailio accepts both as send sockets
    (an unknown socket would leave send_socket unset, with a warning)."""
    pcscf.registered()
    assert mt(pcscf, flags=m.UDP_FALLBACK_TCP) == 1
    assert KSR._rec.send_socket == CLIENT and not KSR._rec.logs["warn"]
    tcp = Pcscf.start(str(pcscf.module.store.path) + "-tcp")
    tcp.registered(proto="tcp")
    assert mt(tcp, flags=m.UDP_FALLBACK_TCP) == 1
    assert KSR._rec.send_socket == f"tcp:{PCSCF}:5100" and not KSR._rec.logs["warn"]
    tcp.module.store.close()


def test_flag_0x200_falls_back_to_tcp_when_the_udp_socket_is_missing(pcscf):
    pcscf.registered()
    tcp_only = [s for s in KSR._sockets if not s[0] == "udp" or s[2] == 5060]
    KSR._sockets[:] = tcp_only
    assert mt(pcscf) == -1  # without the flag: refused, never sent from 5060 outside the SAs
    assert "no listen socket" in "".join(KSR._rec.logs["err"])
    assert mt(pcscf, flags=m.UDP_FALLBACK_TCP) == 1
    assert KSR._rec.send_socket == f"tcp:{PCSCF}:5100"
    assert KSR.pv.get("$du") == f"sip:{UE}:{PORT_US};transport=tcp"


# -- replies to the phone ------------------------------------------------------------------------

def test_udp_replies_leave_from_port_pc_to_port_us(pcscf):
    server = pcscf.registered()
    assert mo(pcscf, server) == 1
    assert (KSR._rec.reply_socket, KSR._rec.reply_target) == (CLIENT, f"udp:{UE}:{PORT_US}")
    assert (KSR.pv.get("$Rp"), KSR.pv.get("$sp")) == (5100, PORT_US)


def test_tcp_replies_stay_on_the_phones_connection(pcscf):
    server = pcscf.registered(proto="tcp")
    assert mo(pcscf, server, proto="tcp") == 1
    assert (KSR._rec.reply_socket, KSR._rec.reply_target) == (None, None)


@pytest.mark.parametrize(("via_port", "socket", "target"), [
    (PORT_UC, SERVER, PORT_UC),
    (PORT_US, CLIENT, PORT_US),
    (5060, CLIENT, PORT_US),
])
def test_flag_0x100_replies_follow_the_via_port(pcscf, via_port, socket, target):
    server = pcscf.registered()
    assert mo(pcscf, server, via_port=via_port, flags=m.USE_VIA) == 1
    assert (KSR._rec.reply_socket, KSR._rec.reply_target) == (socket, f"udp:{UE}:{target}")


def test_request_on_a_protected_port_from_an_unknown_source_fails(pcscf):
    server = pcscf.registered()
    KSR._load_request(request("INVITE", "sip:bob@ims.example", via="10.0.0.3:31000"),
                      ("10.0.0.3", PORT_UC, "udp"), (PCSCF, int(server_param(server, "port-s"))))
    assert pcscf.module.ipsec_forward(KsrMessage(), DOMAIN) == -1
    assert KSR._rec.reply_socket is None


def test_200_ok_to_register_gets_sec_agree_supported_and_required(pcscf):
    server = pcscf.registered()
    reg = register(security_verify=server, via=f"{UE}:{PORT_UC}", cseq=7)
    relay = pcscf.request(reg, source=(UE, PORT_UC, "udp"), local=(PCSCF, 5200)).relays[0]
    KSR._load_reply(reply_to(reg, 200, "OK", ("Supported: path",)), relay)
    assert pcscf.module.ipsec_forward(KsrMessage(), DOMAIN) == 1
    assert KSR._rec.values("Supported") == ["path", "sec-agree"]
    assert KSR._rec.values("Require") == ["sec-agree"]
    KSR._load_reply(reply_to(reg, 200, "OK", ("Supported: sec-agree", "Require: sec-agree")), relay)
    assert pcscf.module.ipsec_forward(KsrMessage(), DOMAIN) == 1
    assert KSR._rec.added == []


def test_reply_without_a_tunnel_fails(pcscf):
    reg = register()
    KSR._load_reply(reply_to(reg, 200, "OK"), reg)
    assert pcscf.module.ipsec_forward(KsrMessage(), DOMAIN) == -1
    assert KSR._rec.added == []
