"""The operator's counters (ipsec/counters.py) through the KSR double's statistics module:
each cause moves its own counter and no other; the gauges follow the store; kamailio.cfg
declares exactly these names."""
from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

import KSR
from ipsec import counters as stat
from ipsec.xfrm import structs as k
from kemi.stats import KsrCounters
from scenario import (CK, IK, OFFER, PCSCF, PORT_UC, UE, Pcscf, challenge, register, reply_to,
                      server_param)

CFG = Path(__file__).resolve().parents[2] / "kamailio.cfg"
DECLARED = re.compile(r'^modparam\("statistics", "variable", "([^"]+)"\)', re.M)


def declared() -> list[str]:
    return DECLARED.findall(CFG.read_text())


@pytest.fixture
def counted(tmp_path):
    """A P-CSCF whose counters are Kamailio statistics (the double's), declared as in
    kamailio.cfg."""
    p = Pcscf.start(str(tmp_path / "ipsec.sqlite"))
    KSR._declare_stats(*declared())
    p.module.counters = KsrCounters()
    yield p
    p.module.store.close()


def values() -> dict[str, int]:
    """Every counter as `$stat(name)` reads it; only the non-zero ones."""
    out = {}
    for name in (*stat.COUNTERS, *stat.GAUGES):
        v = KSR.pv.get(f"$stat({name})")
        if v:
            out[name] = v
    return out


def events() -> dict[str, int]:
    return {n: v for n, v in values().items() if n not in stat.GAUGES}


def protected(p, server, *, verify=None, expires=600, cseq=5, offer=OFFER):
    raw = register(security_client=offer, security_verify=server if verify is None else verify,
                   via=f"{UE}:{PORT_UC}", expires=expires, cseq=cseq)
    return raw, p.request(raw, source=(UE, PORT_UC, "udp"),
                          local=(PCSCF, int(server_param(server, "port-s"))))


def test_kamailio_cfg_declares_every_counter_and_gauges_cannot_be_reset():
    assert declared() == [*stat.COUNTERS, *(f"{g}/no_reset" for g in stat.GAUGES)]


def test_a_registration_creates_one_tunnel(counted):
    counted.registered()
    assert events() == {stat.TUNNELS_CREATED: 1}


def test_a_reregistration_with_the_same_keys_keeps_it(counted):
    server = counted.registered()
    raw, rec = protected(counted, server)
    counted.register_reply(rec.relays[0], reply_to(raw, 401, "Unauthorized",
                                                   (f"WWW-Authenticate: {challenge()}",)))
    assert events() == {stat.TUNNELS_CREATED: 1, stat.TUNNELS_KEPT: 1}


def test_a_rekey_creates_one_and_counts_the_switch_once(counted):
    old = counted.registered()
    offer = (OFFER.replace(f"port-c={PORT_UC}", "port-c=32000")
             .replace("spi-c=1111", "spi-c=5555").replace("spi-s=2222", "spi-s=6666"))
    raw, rec = protected(counted, old, offer=offer, cseq=3)
    rec = counted.register_reply(rec.relays[0], reply_to(raw, 401, "Unauthorized", (
        "WWW-Authenticate: " + challenge(ck=IK, ik=CK),)))
    (new,) = rec.values("Security-Server")
    final = register(security_client=offer, security_verify=new, via=f"{UE}:32000", cseq=4)
    rec = counted.request(final, source=(UE, 32000, "udp"),
                          local=(PCSCF, int(server_param(new, "port-s"))))
    counted.register_reply(rec.relays[0], reply_to(final, 200, "OK", (
        f"Contact: <sip:alice@{UE}:5060>;expires=600",)))
    assert events() == {stat.TUNNELS_CREATED: 2, stat.TUNNELS_REKEYED: 1}


def test_a_deregistration_counts_as_such_when_the_sweep_removes_it(counted):
    server = counted.registered()
    raw, rec = protected(counted, server, expires=0)
    counted.register_reply(rec.relays[0], reply_to(raw, 200, "OK"))
    counted.clock.advance(2)
    assert counted.module.sweep() == 1 and counted.kernel.sas == {}
    assert events() == {stat.TUNNELS_CREATED: 1, stat.REMOVED + stat.DEREGISTRATION: 1}
    assert "de-registered, removed" in KSR._rec.log_text()


def test_destroy_on_a_request_counts_a_deregistration(counted):
    counted.registered()
    KSR._load_request(register(), (UE, 5060, "udp"))
    from kemi.message import KsrMessage
    assert counted.module.ipsec_destroy(KsrMessage(), "location", "sip:alice@ims.example") == 1
    assert events()[stat.REMOVED + stat.DEREGISTRATION] == 1


def test_an_expired_registration_counts_as_expiry(counted):
    counted.registered(expires=60)
    counted.clock.advance(60 + counted.module.expiry_grace + 1)
    assert counted.module.sweep() == 1 and counted.kernel.sas == {}
    assert events() == {stat.TUNNELS_CREATED: 1, stat.REMOVED + stat.EXPIRY: 1}


def test_a_tunnel_the_kernel_lost_counts_at_startup(counted):
    counted.registered()
    c = counted.module.store.find_by_aor("sip:alice@ims.example")[0]
    del counted.kernel.sas[(PCSCF, c.tunnel.lease.spi_pc)]
    counted.module.startup()
    assert events() == {stat.TUNNELS_CREATED: 1, stat.REMOVED + stat.STARTUP: 1}


def _challenge(p, www=None, source=(UE, 5060, "udp"), **kw):
    raw = register(**kw)
    (relay,) = p.request(raw, source=source).relays
    p.register_reply(relay, reply_to(raw, 401, "Unauthorized",
                                     (f"WWW-Authenticate: {www or challenge()}",)))
    assert p.routing.register_failure() == 1
    return KSR._rec


def test_a_kernel_refusal_counts_a_kernel_failure_and_a_503(counted):
    counted.kernel.refuse = lambda r: errno.EINVAL if r.type == k.XFRM_MSG_NEWSA else None
    rec = _challenge(counted)
    assert [r.code for r in rec.replies] == [503]
    assert events() == {stat.CREATE_FAILED + stat.KERNEL: 1, f"{stat.REPLIES}503": 1}


def test_a_challenge_without_keys_counts_against_the_core(counted):
    _challenge(counted, www='Digest realm="ims", nonce="abc", algorithm=AKAv1-MD5')
    assert events() == {stat.CREATE_FAILED + stat.CORE: 1, f"{stat.REPLIES}503": 1}


def test_an_unusable_offer_counts_against_the_phone(counted):
    _challenge(counted, security_client="ipsec-3gpp;alg=foo;spi-c=1;spi-s=2;port-c=3;port-s=4")
    assert events() == {stat.CREATE_FAILED + stat.PHONE: 1, f"{stat.REPLIES}503": 1}


def test_an_empty_pool_counts_as_such(tmp_path):
    p = Pcscf.start(str(tmp_path / "s.sqlite"), IPSEC_SPI_ID_RANGE="2")
    KSR._declare_stats(*declared())
    p.module.counters = KsrCounters()
    p.registered()
    _challenge(p, contact="sip:bob@10.0.0.3:5060", via="10.0.0.3:5060", aor="sip:bob@ims.example",
               source=("10.0.0.3", 5060, "udp"))
    assert events() == {stat.TUNNELS_CREATED: 1, stat.CREATE_FAILED + stat.POOL: 1,
                        f"{stat.REPLIES}503": 1}
    p.module.store.close()


def test_security_verify_refusal_counts_and_answers_403(counted):
    server = counted.registered()
    _, rec = protected(counted, server, verify="ipsec-3gpp;spi-c=1;spi-s=2")
    assert [r.code for r in rec.replies] == [403]
    assert events() == {stat.TUNNELS_CREATED: 1, stat.VERIFY_REFUSED: 1,
                        f"{stat.REPLIES}403": 1}


def test_421_and_403_answers_are_counted(counted):
    rec = counted.request(register(security_client=None))
    assert [r.code for r in rec.replies] == [421]
    rec = counted.request(register(), local=(PCSCF, 5101))  # a protected port, no tunnel
    assert [r.code for r in rec.replies] == [403]
    assert events() == {f"{stat.REPLIES}421": 1, f"{stat.REPLIES}403": 1}


def test_gauges_follow_the_store_at_each_sweep(counted):
    assert counted.module.sweep() == 1
    assert values() == {stat.LEASES_FREE: 50}
    counted.registered()
    counted.registered(ue="10.0.0.3", aor="sip:bob@ims.example")
    assert counted.module.sweep() == 1
    assert {n: values().get(n, 0) for n in stat.GAUGES} == {
        stat.LEASES_USED: 2, stat.LEASES_FREE: 48, stat.TUNNELS_ACTIVE: 2}
    counted.clock.advance(3600)
    assert counted.module.sweep() == 1
    assert {n: values().get(n, 0) for n in stat.GAUGES} == {
        stat.LEASES_USED: 0, stat.LEASES_FREE: 50, stat.TUNNELS_ACTIVE: 0}


def test_an_undeclared_counter_is_an_error_line_not_an_exception(counted):
    KSR._reset()
    KsrCounters().count(stat.TUNNELS_CREATED)
    assert "variable <ipsec_tunnels_created> not defined" in KSR._rec.log_text()


def test_gauges_survive_a_reset_and_counters_do_not():
    KSR._reset()
    KSR._declare_stats(*declared())
    c = KsrCounters()
    c.count(stat.TUNNELS_CREATED, 3)
    c.gauge(stat.LEASES_USED, 7)
    KSR.statistics.reset_stat(stat.TUNNELS_CREATED)
    KSR.statistics.reset_stat(stat.LEASES_USED)
    assert values() == {stat.LEASES_USED: 7}



def test_a_challenge_the_phone_never_used_counts_as_unconfirmed(counted):
    from cli_support import challenged
    challenged(counted, ue="10.0.0.9", aor="sip:carol@ims.example")
    counted.clock.advance(counted.module.limits.pending_lifetime + 1)
    assert counted.module.sweep() == 1 and counted.kernel.sas == {}
    assert events() == {stat.TUNNELS_CREATED: 1, stat.REMOVED + stat.UNCONFIRMED: 1}


def test_tunnels_an_operator_drops_with_the_cli_are_counted_at_the_next_sweep(counted):
    from cli_support import Cli, sockets_of
    from scenario import defines, listen_sockets
    counted.registered()
    cli = Cli(defines(counted.module.store.path), counted.kernel, counted.clock,
              sockets_of(listen_sockets(counted.module.params)))
    assert cli("drop", UE).code == 0 and counted.kernel.sas == {}
    assert stat.REMOVED + stat.OPERATOR not in events()  # the CLI cannot reach Kamailio
    assert counted.module.sweep() == 1
    assert events()[stat.REMOVED + stat.OPERATOR] == 1
    assert counted.module.sweep() == 1  # counted once
    assert events()[stat.REMOVED + stat.OPERATOR] == 1


def test_replies_the_reply_route_drops_are_counted_and_those_it_lets_go_are_not(counted):
    """A stray reply it may not forward, one with keys for no transaction, and one of a
    transaction from a stranger at a protected client port: 3 drops; a reply of a
    transaction from the core: none."""
    import kemi.pcscf
    from scenario import CLIENT_PORT, CORE
    app = kemi.pcscf.kamailio(counted.routing)
    counted.registered()
    before = events()
    reg = register()
    inv = register().replace("REGISTER", "INVITE")
    arrivals = [
        (reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge()}",)), reg,
         (CORE, 5060, "udp"), (PCSCF, 5060), False),
        (reply_to(inv, 200, "OK"), inv, (UE, 44817, "udp"), (PCSCF, 5060), False),
        (reply_to(inv, 486, "Busy Here"), inv, (UE, 44817, "udp"), (PCSCF, CLIENT_PORT), True),
        (reply_to(inv, 180, "Ringing"), inv, (CORE, 5060, "udp"), (PCSCF, 5060), True),
    ]
    for raw, req, source, local, in_transaction in arrivals:
        KSR._load_reply(raw, req, source=source, local=local, in_transaction=in_transaction)
        app.ksr_reply_route(None)
    after = events()
    assert after.get(stat.REPLIES_DROPPED, 0) - before.get(stat.REPLIES_DROPPED, 0) == 3
