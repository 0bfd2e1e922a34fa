"""A spoofed REGISTER must not cut a phone off (issue 10, finding 6), over the KSR double.

Before (87e7b99^): one REGISTER from the victim's address offering its protected ports made
the victim's protected requests 403 (the newest contact on that address:port won, its
pending tunnel did not carry them); one from the victim's address with its AoR rewrote the
victim's registered Contact and transport.
"""
from __future__ import annotations

from scenario import (AOR, CORE, OFFER, PCSCF, PORT_UC, PORT_US, UE, challenge, register,
                      reply_to, request, server_param)

MALLORY = "sip:mallory@ims.example"
# the victim's protected ports, other SPIs (the same SPIs clash with its tunnel and are refused)
SHADOW_OFFER = OFFER.replace("spi-c=1111", "spi-c=7777").replace("spi-s=2222", "spi-s=8888")


def spoofed(p, *, source: tuple[str, int], aor: str, contact: str,
            client: str = SHADOW_OFFER) -> str | None:
    """An unprotected REGISTER as an attacker sends it, challenged by the core: the
    Security-Server of its 401 (None: refused)."""
    raw = register(aor=aor, contact=contact, via=f"{source[0]}:{source[1]}",
                   security_client=client, cseq=7)
    rec = p.request(raw, source=(*source, "udp"))
    rec = p.register_reply(rec.relays[0], reply_to(raw, 401, "Unauthorized",
                                                   (f"WWW-Authenticate: {challenge()}",)))
    servers = rec.values("Security-Server")
    return servers[0] if servers else None


def protected_invite(p, server: str):
    raw = request("INVITE", "sip:bob@ims.example", via=f"{UE}:{PORT_UC}",
                  extra=(f"Security-Verify: {server}", "Require: sec-agree"))
    return p.request(raw, source=(UE, PORT_UC, "udp"),
                     local=(PCSCF, int(server_param(server, "port-s"))))


def test_a_pending_tunnel_on_the_victims_ports_does_not_shadow_its_live_one(pcscf):
    server = pcscf.registered()
    shadow = spoofed(pcscf, source=(UE, 5070), aor=MALLORY, contact=f"sip:mallory@{UE}:5070")
    assert shadow is not None  # its SAs are staged: same phone ports, another port pair
    rec = protected_invite(pcscf, server)
    assert rec.replies == [] and len(rec.relays) == 1, rec.log_text()
    (relay,) = rec.relays
    assert (relay.reply_socket, relay.reply_target) == (
        f"udp:{PCSCF}:{server_param(server, 'port-c')}", f"udp:{UE}:{PORT_US}")
    # and the victim's re-registration through its SAs is the victim's
    raw = register(security_verify=server, via=f"{UE}:{PORT_UC}", cseq=9)
    rec = pcscf.request(raw, source=(UE, PORT_UC, "udp"),
                        local=(PCSCF, int(server_param(server, "port-s"))))
    assert rec.replies == [] and len(rec.relays) == 1, rec.log_text()


def test_the_shadow_tunnel_serves_only_its_own_port_pair(pcscf):
    server = pcscf.registered()
    shadow = spoofed(pcscf, source=(UE, 5070), aor=MALLORY, contact=f"sip:mallory@{UE}:5070")
    assert server_param(shadow, "port-s") != server_param(server, "port-s")
    c = pcscf.module.store.find_by_flow(UE, PORT_UC, int(server_param(shadow, "port-s")))
    assert c.aor == MALLORY and c.pending is not None


def test_an_unprotected_register_with_the_victims_aor_from_its_address_changes_nothing(pcscf):
    """Contact rewritten (here to TCP) before: MT requests went over TCP, which the victim
    never asked for; now the binding changes only through the SAs or the core's 200 OK."""
    pcscf.registered()
    before = pcscf.module.store.find_by_aor(AOR)
    spoofed(pcscf, source=(UE, 5060), aor=AOR, contact=f"sip:alice@{UE}:5060;transport=tcp")
    (after,) = pcscf.module.store.find_by_aor(AOR)
    assert (after.uri, after.transport, after.via, after.state, after.expires, after.tunnel) == (
        before[0].uri, before[0].transport, before[0].via, before[0].state, before[0].expires,
        before[0].tunnel)
    rec = pcscf.request(request("INVITE", f"sip:alice@{UE}:5060", via=f"{CORE}:5060"),
                        source=(CORE, 5060, "udp"))
    (relay,) = rec.relays
    assert (relay.dst_uri, relay.send_socket) == (f"sip:{UE}:{PORT_US}", f"udp:{PCSCF}:5100")


def test_a_phone_that_lost_its_sas_registers_again_from_its_address(pcscf):
    """The legitimate case the rule must leave working: unprotected REGISTER from the
    registered phone's own address (it rebooted), 401, protected REGISTER through the new
    SAs, 200 OK: that 200 moves the binding (new Contact) and the new SAs serve."""
    pcscf.registered()
    offer = OFFER.replace("spi-c=1111", "spi-c=3333").replace("spi-s=2222", "spi-s=4444") \
        .replace("port-c=31000", "port-c=33000").replace("port-s=31001", "port-s=33001")
    server = spoofed(pcscf, source=(UE, 5060), aor=AOR, contact=f"sip:alice@{UE}:33001",
                     client=offer)
    raw = register(contact=f"sip:alice@{UE}:33001", via=f"{UE}:33000", security_client=offer,
                   security_verify=server, cseq=8)
    rec = pcscf.request(raw, source=(UE, 33000, "udp"),
                        local=(PCSCF, int(server_param(server, "port-s"))))
    assert rec.relays, rec.log_text()
    pcscf.register_reply(rec.relays[0], reply_to(raw, 200, "OK", (
        f"Contact: <sip:alice@{UE}:33001>;expires=600",)))
    (c,) = pcscf.module.store.find_by_aor(AOR)
    assert c.uri == f"sip:alice@{UE}:33001" and c.tunnel.ue.port_uc == 33000


def test_a_rekey_is_not_blocked_by_a_pending_tunnel_on_the_phones_ports(pcscf):
    """The shadow tunnel holds the other port pair with the victim's port_us: the victim's
    re-key (keeping its port_us, 33.203 7.4) needs a pair whose SAs would clash with either
    its own or the shadow's. The shadow, unconfirmed, goes; before, the re-key failed."""
    server = pcscf.registered()
    spoofed(pcscf, source=(UE, 5070), aor=MALLORY, contact=f"sip:mallory@{UE}:5070")
    rekey_offer = (OFFER.replace("spi-c=1111", "spi-c=5555").replace("spi-s=2222", "spi-s=6666")
                   .replace(f"port-c={PORT_UC}", "port-c=32000"))
    raw = register(security_client=rekey_offer, security_verify=server, via=f"{UE}:{PORT_UC}",
                   cseq=3)
    rec = pcscf.request(raw, source=(UE, PORT_UC, "udp"),
                        local=(PCSCF, int(server_param(server, "port-s"))))
    rec = pcscf.register_reply(rec.relays[0], reply_to(raw, 401, "Unauthorized", (
        f"WWW-Authenticate: {challenge()}",)))
    assert rec.values("Security-Server"), rec.log_text()
    assert [c.aor for c in pcscf.module.store.contacts_matching(host=UE)] == [AOR]


def test_a_pending_tunnel_on_the_victims_ports_does_not_take_its_stray_replies(pcscf):
    """A 2xx from the core for no transaction goes to the phone's port through the SAs
    Store.find_by_phone_port picks: the victim's in use, not a spoofer's staged ones on the
    same phone ports (kemi/replies.stray_path)."""
    server = pcscf.registered()
    shadow = spoofed(pcscf, source=(UE, 5070), aor=MALLORY, contact=f"sip:mallory@{UE}:5070")
    c = pcscf.module.store.find_by_phone_port(UE, PORT_US)
    assert c.aor == AOR and c.tunnel.lease.port_pc == int(server_param(server, "port-c"))
    assert server_param(shadow, "port-c") != server_param(server, "port-c")


def test_with_only_a_pending_tunnel_it_is_the_one_stray_replies_take(pcscf):
    shadow = spoofed(pcscf, source=(UE, 5070), aor=MALLORY, contact=f"sip:mallory@{UE}:5070")
    c = pcscf.module.store.find_by_phone_port(UE, PORT_UC)
    assert c.aor == MALLORY and c.tunnel is c.pending
    assert c.tunnel.lease.port_ps == int(server_param(shadow, "port-s"))
    assert pcscf.module.store.find_by_phone_port(UE, 5070) is None
