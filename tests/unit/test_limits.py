"""Limits against floods of challenged REGISTERs (issue 10, finding 1): ipsec/limits.py's
rules one by one, then the P-CSCF over the KSR double and the fake kernel under a flood.

Before (87e7b99^), every challenged REGISTER kept an SPI pair and its SAs for 240 s whatever
its source or AoR: a few REGISTERs a second emptied the pool, new phones got 503 and
registered phones could not re-key.
"""
from __future__ import annotations

import pytest

import KSR
from ipsec.limits import Limits, Pressure, Verdict, weigh
from ipsec.params import ParamError
from ipsec.store import UeLocks
from scenario import (AOR, OFFER, PCSCF, PORT_UC, UE, Pcscf, challenge, register, reply_to,
                      server_param)

# -- the rules -----------------------------------------------------------------------------

L = Limits(per_host=2, per_aor=3, reserve=5, pending_lifetime=30.0)


def test_a_challenge_within_every_limit_leases():
    assert weigh(L, Pressure(False, 6, host=(1,), aor=(1, 2), oldest=(1, 2))) == Verdict()


def test_over_the_limit_of_an_address_its_oldest_go():
    assert weigh(L, Pressure(False, 50, host=(1, 2, 3))) == Verdict((1, 2))


def test_over_the_limit_of_an_aor_its_oldest_go_once_each():
    assert weigh(L, Pressure(False, 50, host=(7, 8), aor=(7, 9, 10))) == Verdict((7,))


def test_an_unprotected_register_never_takes_the_reserve():
    assert weigh(L, Pressure(False, 5, oldest=(4, 6))) == Verdict((4,))
    refused = weigh(L, Pressure(False, 5))
    assert refused.evict == () and "REKEY_RESERVE" in refused.refuse


def test_a_rekey_takes_the_reserve_and_then_an_unconfirmed_pair():
    assert weigh(L, Pressure(True, 1, host=(1, 2, 3), oldest=(1,))) == Verdict()
    assert weigh(L, Pressure(True, 0, oldest=(4, 6))) == Verdict((4,))


def test_no_pair_at_all_is_left_to_the_lease_to_say():
    assert weigh(L, Pressure(True, 0)) == Verdict()
    assert weigh(Limits(reserve=0), Pressure(False, 0)) == Verdict()


def test_limits_from_defines_with_defaults_and_bad_values():
    assert Limits.from_defines(lambda name: "", 500) == Limits(8, 4, 50, 30.0)
    got = Limits.from_defines({"PENDING_PER_HOST": "3", "PENDING_PER_AOR": "2",
                               "REKEY_RESERVE": "20", "PENDING_LIFETIME": "60"}.get, 100)
    assert got == Limits(3, 2, 20, 60.0)
    for name, value in (("PENDING_PER_HOST", "0"), ("REKEY_RESERVE", "95"),
                        ("PENDING_LIFETIME", "x"), ("PENDING_PER_AOR", "-1")):
        with pytest.raises(ParamError, match=name):
            Limits.from_defines({name: value}.get, 100)


# -- the P-CSCF under a flood --------------------------------------------------------------

def offer(i: int) -> str:
    """A Security-Client of its own (SPIs and ports) for the i-th REGISTER."""
    return (f"ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;spi-c={10000 + 2 * i};"
            f"spi-s={10001 + 2 * i};port-c={40000 + 2 * i};port-s={40001 + 2 * i}")


def challenged(p: Pcscf, host: str, port: int, *, aor: str = AOR, i: int = 0) -> str | None:
    """An unprotected REGISTER from host:port that the core challenges: the Security-Server
    the 401 carries, or None when it became a 503."""
    raw = register(aor=aor, contact=f"sip:u{i}@{host}:{port}", via=f"{host}:{port}",
                   security_client=offer(i))
    rec = p.request(raw, source=(host, port, "udp"))
    rec = p.register_reply(rec.relays[0], reply_to(raw, 401, "Unauthorized",
                                                   (f"WWW-Authenticate: {challenge()}",)))
    servers = rec.values("Security-Server")
    return servers[0] if servers else None


def authenticated(p: Pcscf, host: str, server: str, *, aor: str = AOR, i: int = 0) -> bool:
    """The protected REGISTER through the SAs of `server`, then the core's 200 OK."""
    port_uc, port_us = 40000 + 2 * i, 40001 + 2 * i
    raw = register(aor=aor, contact=f"sip:u{i}@{host}:{port_us}", via=f"{host}:{port_uc}",
                   security_client=offer(i), security_verify=server, cseq=2)
    rec = p.request(raw, source=(host, port_uc, "udp"),
                    local=(PCSCF, int(server_param(server, "port-s"))))
    if not rec.relays:
        return False
    p.register_reply(rec.relays[0], reply_to(raw, 200, "OK", (
        f"Contact: <sip:u{i}@{host}:{port_us}>;expires=600",)))
    return p.module.store.find_by_flow(host, port_uc, int(server_param(server, "port-s"))
                                       ).state == "registered"


def unconfirmed(p: Pcscf) -> list[tuple[str, int, str]]:
    """(address, port, AoR) of every contact whose phone never came back through SAs."""
    return p.module.store._db().execute(
        "SELECT received_host, received_port, aor FROM contacts WHERE state = 'pending'"
        " AND tunnel_id IS NULL AND pending_tunnel_id IS NOT NULL ORDER BY id").fetchall()


def lease_count(p: Pcscf) -> int:
    return p.module.store._db().execute("SELECT count(*) FROM tunnels").fetchone()[0]


def rekeyed(p: Pcscf, old: str, *, via_port: int = PORT_UC, i: int = 900) -> str | None:
    """A registered phone (scenario's) re-keys: the i-th offer through its SAs (from
    `via_port`), 401, protected REGISTER through the new SAs, 200. The new Security-Server,
    or None if refused."""
    new_offer, port_uc, port_us = offer(i), 40000 + 2 * i, 40001 + 2 * i
    raw = register(security_client=new_offer, security_verify=old, via=f"{UE}:{via_port}",
                   cseq=2 * i)
    rec = p.request(raw, source=(UE, via_port, "udp"), local=(PCSCF, int(server_param(old, "port-s"))))
    assert rec.relays, rec.log_text()
    rec = p.register_reply(rec.relays[0], reply_to(raw, 401, "Unauthorized",
                                                   (f"WWW-Authenticate: {challenge()}",)))
    if not rec.values("Security-Server"):
        return None
    (new,) = rec.values("Security-Server")
    final = register(security_client=new_offer, security_verify=new, via=f"{UE}:{port_uc}",
                     contact=f"sip:alice@{UE}:{port_us}", cseq=2 * i + 1)
    rec = p.request(final, source=(UE, port_uc, "udp"), local=(PCSCF, int(server_param(new, "port-s"))))
    assert rec.relays, rec.log_text()
    p.register_reply(rec.relays[0], reply_to(final, 200, "OK", (
        f"Contact: <sip:alice@{UE}:{port_us}>;expires=600",)))
    return new


def test_one_address_keeps_at_most_per_host_unconfirmed_its_latest_and_the_phone_gets_in(pcscf):
    """12 challenges from one address (new ports and SPIs each time): 8 stay, the latest;
    the first 4 are gone from store and kernel; the phone of the last one registers."""
    servers = [challenged(pcscf, UE, 6000 + i, aor=f"sip:u{i}@ims.example", i=i)
               for i in range(12)]
    assert all(servers)
    assert [port for _, port, _ in unconfirmed(pcscf)] == [6000 + i for i in range(4, 12)]
    assert len(pcscf.kernel.sas) == 8 * 4 and len(pcscf.kernel.policies_by_id) == 8 * 4
    assert lease_count(pcscf) == 8
    gone = {int(server_param(s, "spi-c")) for s in servers[:4]}
    assert not gone & {spi for _, spi in pcscf.kernel.sas}
    assert authenticated(pcscf, UE, servers[-1], aor="sip:u11@ims.example", i=11)


def test_one_aor_keeps_at_most_per_aor_unconfirmed(pcscf):
    hosts = [f"10.0.1.{i}" for i in range(1, 7)]
    assert all(challenged(pcscf, h, 5060, i=i) for i, h in enumerate(hosts))
    assert [h for h, _, _ in unconfirmed(pcscf)] == hosts[2:]
    assert lease_count(pcscf) == 4


def flood(p: Pcscf, n: int, start: int = 0) -> list[str | None]:
    """n challenged REGISTERs, each from an address and AoR of its own (no per-address or
    per-AoR limit applies: only the pool's)."""
    return [challenged(p, f"10.1.{(start + i) // 250}.{(start + i) % 250 + 1}", 5060,
                       aor=f"sip:flood{start + i}@ims.example", i=start + i) for i in range(n)]


def test_a_flood_leaves_the_reserve_to_rekeys_and_new_phones_still_get_in(tmp_path):
    """10 pairs, 2 kept for re-keys. A registered phone; 30 flood challenges from 30
    addresses: each got its 401 (the oldest unconfirmed one gave its pair up), never more
    than 8 pairs taken. The registered phone re-keys, a new phone registers, the flood goes
    on, the phone re-keys again. Before: the 10th flood REGISTER emptied the pool, and the
    re-key and the new phone got 503."""
    p = Pcscf.start(str(tmp_path / "s.sqlite"), IPSEC_SPI_ID_RANGE="20", REKEY_RESERVE="20")
    server = p.registered()
    assert all(flood(p, 30))
    assert lease_count(p) == 8 and len(unconfirmed(p)) == 7
    server = rekeyed(p, server)
    assert server is not None
    newcomer = challenged(p, "10.0.0.3", 5060, aor="sip:bob@ims.example", i=500)
    assert newcomer and authenticated(p, "10.0.0.3", newcomer, aor="sip:bob@ims.example", i=500)
    assert all(flood(p, 30, start=30))
    assert lease_count(p) <= 8 + 2 and len(unconfirmed(p)) <= 6
    assert rekeyed(p, server, via_port=41800, i=901) is not None
    assert len(p.kernel.sas) == 4 * lease_count(p)


def test_a_rekey_takes_the_pair_of_an_unconfirmed_contact_when_none_is_free(tmp_path):
    p = Pcscf.start(str(tmp_path / "s.sqlite"), IPSEC_SPI_ID_RANGE="4", REKEY_RESERVE="0")
    server = p.registered()
    assert all(flood(p, 1))
    assert lease_count(p) == 2
    assert rekeyed(p, server) is not None
    assert unconfirmed(p) == []


def test_a_pool_held_by_registered_phones_refuses_with_a_503(tmp_path):
    p = Pcscf.start(str(tmp_path / "s.sqlite"), IPSEC_SPI_ID_RANGE="4", REKEY_RESERVE="50")
    p.registered()
    assert flood(p, 1) == [None]
    assert "REKEY_RESERVE" in "".join(KSR._rec.logs["err"])
    assert lease_count(p) == 1


def test_an_eviction_spares_a_phone_another_worker_is_busy_with(tmp_path):
    """The oldest unconfirmed contact's phone lock is held elsewhere (a worker installing
    its SAs): it is not waited for nor touched; the next oldest goes instead."""
    p = Pcscf.start(str(tmp_path / "s.sqlite"), IPSEC_SPI_ID_RANGE="6", REKEY_RESERVE="0")
    hosts = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    assert all(flood(p, 3))
    other_worker = UeLocks(p.module.store.path + ".lock")
    assert len({UeLocks.stripe(h) for h in [*hosts, "10.1.0.4"]}) == 4
    with other_worker.held(hosts[0]):
        assert flood(p, 1, start=3) != [None]
    assert [h for h, _, _ in unconfirmed(p)] == [hosts[0], hosts[2], "10.1.0.4"]
    assert len(p.kernel.sas) == 3 * 4
    other_worker.close()


def test_an_unconfirmed_challenge_lives_pending_lifetime(pcscf):
    """30 s by default (the C module's temporary SAs: 240 s, as this module's before)."""
    assert challenged(pcscf, "10.0.1.1", 5060)
    pcscf.clock.advance(25)
    pcscf.module.sweep()
    assert len(unconfirmed(pcscf)) == 1
    pcscf.clock.advance(6)
    pcscf.module.sweep()
    assert unconfirmed(pcscf) == [] and pcscf.kernel.sas == {} and lease_count(pcscf) == 0


def test_pending_lifetime_is_a_define(tmp_path):
    p = Pcscf.start(str(tmp_path / "s.sqlite"), PENDING_LIFETIME="60")
    assert challenged(p, "10.0.1.1", 5060)
    p.clock.advance(45)
    p.module.sweep()
    assert len(unconfirmed(p)) == 1


def test_a_rekey_the_phone_never_completes_loses_its_pending_sas_and_keeps_its_own(pcscf):
    server = pcscf.registered()
    pcscf.module.sweep()  # its kernel lifetime renewed
    in_use = dict(pcscf.kernel.sas)
    raw = register(security_client=offer(7), security_verify=server, via=f"{UE}:{PORT_UC}", cseq=3)
    rec = pcscf.request(raw, source=(UE, PORT_UC, "udp"), local=(PCSCF, int(server_param(server, "port-s"))))
    pcscf.register_reply(rec.relays[0], reply_to(raw, 401, "Unauthorized",
                                                 (f"WWW-Authenticate: {challenge()}",)))
    assert len(pcscf.kernel.sas) == 8
    pcscf.clock.advance(31)
    pcscf.module.sweep()
    assert pcscf.kernel.sas == in_use and lease_count(pcscf) == 1
    c = pcscf.module.store.find_by_aor(AOR)[0]
    assert (c.state, c.pending) == ("registered", None)
    assert "pending tunnel spi-c=" in KSR._rec.log_text()


def test_an_eviction_is_logged_with_the_contact_and_the_tunnel(pcscf):
    for i in range(9):
        assert challenged(pcscf, UE, 6000 + i, aor=f"sip:u{i}@ims.example", i=i)
    text = KSR._rec.log_text()
    assert "contact 1: unconfirmed tunnel 10.0.0.2 spi-c=" in text and "evicted" in text
    assert OFFER not in text


def test_a_rekey_evicts_unconfirmed_tunnels_on_its_own_phone_ports():
    assert weigh(L, Pressure(True, 50, squatters=(3,), oldest=(1,))) == Verdict((3,))
    assert weigh(L, Pressure(False, 50, squatters=(3,))) == Verdict()
