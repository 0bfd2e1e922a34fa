"""A spoofed REGISTER must not cut a phone off (issue 10, finding 6): real Kamailio, real ESP.

Before (87e7b99^): a REGISTER from the victim's address offering its protected ports made
the victim's protected requests 403 Forbidden - No Tunnel; one from its address with its AoR
rewrote its registered Contact (here: to TCP, so MT requests went over TCP).
"""
from __future__ import annotations

import random
import socket

from checks import through_esp
from pcscf_net import Phone, _socket, assert_no_keys, mt_call
from sip import Msg, hostport, parse, token


def spoofed_register(phone: Phone, sock: socket.socket, *, aor: str, contact: str,
                     port_c: int, port_s: int) -> Msg:
    """An unprotected REGISTER as an attacker on the phone's address sends it, and the 401
    the P-CSCF answers it with (its SAs staged)."""
    sport = sock.getsockname()[1]
    call_id = token()
    m = Msg("REGISTER sip:ims.test SIP/2.0")
    for name, value in (
            ("Via", f"SIP/2.0/UDP {hostport(phone.ip, sport)};branch=z9hG4bK{token()};rport"),
            ("Max-Forwards", "70"), ("From", f"<{aor}>;tag={token()}"), ("To", f"<{aor}>"),
            ("Call-ID", call_id), ("CSeq", "1 REGISTER"), ("Contact", f"<{contact}>;expires=600"),
            ("Supported", "path, sec-agree"), ("Require", "sec-agree"),
            ("Proxy-Require", "sec-agree"),
            ("Security-Client", "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;prot=esp;mod=trans;"
                                f"spi-c={random.randrange(1 << 20, 1 << 31)};"
                                f"spi-s={random.randrange(1 << 20, 1 << 31)};"
                                f"port-c={port_c};port-s={port_s}")):
        m.add(name, value)
    sock.settimeout(0.5)
    for _ in range(16):
        sock.sendto(m.encode(), (phone.pcscf, 5060))
        try:
            while True:
                r = parse(sock.recv(65535))
                if r.get("Call-ID") == call_id and r.status == 401:
                    assert r.get("Security-Server"), r.text()
                    assert_no_keys(r)
                    return r
        except TimeoutError:
            continue
    raise AssertionError("the spoofed REGISTER got no 401")


def message(phone: Phone) -> None:
    phone.request("MESSAGE", "sip:bob@ims.test", call_id=token(), to="<sip:bob@ims.test>")
    phone.wait_reply(200, "MESSAGE")


def test_a_register_offering_the_victims_ports_does_not_shadow_its_tunnel(link, scscf, kamailio):
    victim = Phone(link, scscf, user="victim")
    victim.full_registration()
    attacker = _socket(link.ue, 4, socket.SOCK_DGRAM)
    attacker.bind((victim.ip, 0))
    try:
        spoofed_register(victim, attacker, aor="sip:mallory@ims.test",
                         contact=f"sip:mallory@{victim.ip}:{victim.tunnel.port_us}",
                         port_c=victim.tunnel.port_uc, port_s=victim.tunnel.port_us)
    finally:
        attacker.close()
    with through_esp(victim, "sa1", "sa3"):
        message(victim)
        victim.new_offer(keep_server_port=True)  # a re-key through its SAs is its own too
        victim.full_registration()
        message(victim)


def test_a_register_with_the_victims_aor_from_its_address_leaves_its_binding(link, scscf, kamailio):
    victim = Phone(link, scscf, user="victim2")
    victim.full_registration()
    spoofed_register(victim, victim._udp[victim.port_plain], aor=victim.aor,
                     contact=f"sip:{victim.user}@{victim.ip}:{victim.tunnel.port_us};transport=tcp",
                     port_c=47000 + random.randrange(500), port_s=48000 + random.randrange(500))
    with through_esp(victim, "sa3", "sa4"):
        mt_call(victim, scscf)  # over UDP, as the victim registered (asserted inside)
    message(victim)
