"""ipsec.module over the KSR double: create, destroy, the registrar steps, sweep and start-up.

Every test looks at outcomes: what the fake kernel holds, what the store holds, what the
reply would carry, what was logged. The kernel is `scenario.FakeKernel` (it decodes the real
netlink requests); the store is a real SQLite file.
"""
from __future__ import annotations

import errno

import pytest

import KSR
from ipsec import module as m
from ipsec import tunnel
from ipsec.algorithms import VALID_PAIRS, esp_algs
from ipsec.sipuri import Address
from ipsec.store import Lease, UeSide, UnknownContact
from ipsec.tunnel import MARKER
from ipsec.xfrm import SA, Dir, Request, Selector, codec
from ipsec.xfrm import structs as k
from kemi.message import KsrMessage
from scenario import (AOR, CK, CORE, DOMAIN, IK, OFFER, PCSCF, PORT_UC, PORT_US, UE, Pcscf,
                      challenge, register, reply_to, request, server_param)

OTHER_UE = "10.0.0.3"


def pending(p: Pcscf, raw: str | None = None, source=(UE, 5060, "udp")) -> str:
    raw = raw or register(contact=f"sip:alice@{source[0]}:{source[1]}", via=f"{source[0]}:{source[1]}")
    KSR._load_request(raw, source)
    assert p.module.save_pending(KsrMessage(), DOMAIN) == 1
    return raw


def create(p: Pcscf, reg: str, *, www: str | None = challenge(), source=(UE, 5060, "udp"),
           local=(PCSCF, 5060), flags: int = 0, extra: tuple[str, ...] = ()) -> int:
    headers = (f"WWW-Authenticate: {www}",) if www is not None else ()
    KSR._load_reply(reply_to(reg, 401, "Unauthorized", headers + extra), reg,
                    request_source=source, request_local=local, source=(CORE, 5060, "udp"))
    return p.module.ipsec_create(KsrMessage(), DOMAIN, flags)


def leases(p: Pcscf) -> list[tuple[int, int]]:
    db = p.module.store._db()
    return db.execute("SELECT spi_pc, spi_ps FROM tunnels ORDER BY spi_pc").fetchall()


def age_leases(p: Pcscf, seconds: float) -> None:
    """Make every lease `seconds` older, by the store's wall clock and the module's."""
    p.module.store._db().execute("UPDATE tunnels SET leased_at = leased_at - ?", (seconds,))
    p.clock.advance(seconds)


def contact_of(p: Pcscf, host: str = UE, port: int = 5060):
    return p.module.store.find_by_received(Address(host, port, "udp"))


def assert_nothing_left(p: Pcscf) -> None:
    assert p.kernel.sas == {} and p.kernel.policies_by_id == {}
    assert leases(p) == []
    c = contact_of(p)
    assert c is None or c.tunnel is None


def assert_no_keys_logged() -> None:
    text = KSR._rec.log_text().lower()
    assert CK not in text and IK not in text


# -- ipsec_create ---------------------------------------------------------------------------

def test_create_installs_4_sas_and_4_policies_matching_security_server(pcscf):
    reg = pending(pcscf)
    assert create(pcscf, reg) == 1
    (server,) = KSR._rec.values("Security-Server")
    spi_c, spi_s = int(server_param(server, "spi-c")), int(server_param(server, "spi-s"))
    port_c, port_s = int(server_param(server, "port-c")), int(server_param(server, "port-s"))
    assert (server_param(server, "alg"), server_param(server, "ealg")) == ("hmac-sha-1-96", "aes-cbc")
    # 33.203 7.1: SA1 uc->ps spi_ps, SA2 ps->uc spi_uc, SA3 pc->us spi_us, SA4 us->pc spi_pc
    assert pcscf.kernel.flows() == {
        (UE, PORT_UC, PCSCF, port_s, spi_s), (PCSCF, port_s, UE, PORT_UC, 1111),
        (PCSCF, port_c, UE, PORT_US, 2222), (UE, PORT_US, PCSCF, port_c, spi_c)}
    assert all(s.sel.user == MARKER and (s.auth, s.crypt) == ("hmac(sha1)", "cbc(aes)")
               for s in pcscf.kernel.sas.values())
    pols = pcscf.kernel.policies(user=MARKER)
    assert sorted(p.dir for p in pols) == [Dir.IN, Dir.IN, Dir.OUT, Dir.OUT]
    assert {(p.sel.src, p.sel.sport, p.sel.dst, p.sel.dport, p.templates[0].reqid) for p in pols} \
        == pcscf.kernel.flows()
    assert leases(pcscf) == [(spi_c, spi_s)]
    # offered, not yet in use: the phone's first REGISTER through it promotes it (33.203 7.4)
    assert contact_of(pcscf).pending.security_server == server


def test_create_takes_ck_ik_out_of_the_challenge_and_adds_sec_agree(pcscf):
    reg = pending(pcscf)
    assert create(pcscf, reg) == 1
    (www,) = KSR._rec.values("WWW-Authenticate")
    assert "ck=" not in www and "ik=" not in www and CK not in www and IK not in www
    assert 'nonce="bm9uY2U="' in www and 'qop="auth"' in www
    assert KSR._rec.values("Supported") == ["sec-agree"]
    assert_no_keys_logged()


def test_create_does_not_repeat_sec_agree_already_supported(pcscf):
    reg = pending(pcscf)
    assert create(pcscf, reg, extra=("Supported: path, sec-agree",)) == 1
    assert KSR._rec.values("Supported") == ["path, sec-agree"]


def test_create_chooses_the_offer_from_every_security_client_header(pcscf):
    """A `digest` mechanism first, the ipsec-3gpp offers in a second header (C module FAIL)."""
    reg = pending(pcscf, register(security_client="digest;d-alg=md5", extra=(
        "Security-Client: " + OFFER.replace("aes-cbc", "null"),)))
    assert create(pcscf, reg) == 1
    assert server_param(KSR._rec.values("Security-Server")[0], "ealg") == "null"
    assert {s.crypt for s in pcscf.kernel.sas.values()} == {"ecb(cipher_null)"}


def test_create_again_with_same_keys_and_offer_keeps_the_tunnel(pcscf):
    reg = pending(pcscf)
    assert create(pcscf, reg) == 1
    first, sas = KSR._rec.values("Security-Server"), dict(pcscf.kernel.sas)
    assert create(pcscf, reg) == 1
    assert KSR._rec.values("Security-Server") == first
    assert pcscf.kernel.sas == sas and len(leases(pcscf)) == 1


def test_reregistration_with_new_keys_builds_new_sas_and_drops_the_old_after_200(pcscf):
    old = pcscf.registered()
    old_spi = int(server_param(old, "spi-c"))
    new_offer = (OFFER.replace("31000", "32000").replace("31001", "32001")
                 .replace("1111", "3333").replace("2222", "4444"))
    rereg = register(security_client=new_offer, security_verify=old, via=f"{UE}:{PORT_UC}", cseq=3)
    relay = pcscf.request(rereg, source=(UE, PORT_UC, "udp"),
                          local=(PCSCF, int(server_param(old, "port-s")))).relays[0]
    rec = pcscf.register_reply(relay, reply_to(rereg, 401, "Unauthorized", (
        "WWW-Authenticate: " + challenge(ck=IK, ik=CK),)))
    assert rec.reply_status is None, rec.log_text()
    (new,) = rec.values("Security-Server")
    assert new != old
    assert len(pcscf.kernel.sas) == 8  # the old SAs carry the 401 and the next REGISTER
    protected = register(security_client=new_offer, security_verify=new, via=f"{UE}:32000", cseq=4)
    relay = pcscf.request(protected, source=(UE, 32000, "udp"),
                          local=(PCSCF, int(server_param(new, "port-s")))).relays[0]
    pcscf.register_reply(relay, reply_to(protected, 200, "OK", (f"Contact: <sip:alice@{UE}:5060>;expires=600",)))
    assert {spi for _, spi in pcscf.kernel.sas} == {int(server_param(new, "spi-c")),
                                                      int(server_param(new, "spi-s")), 3333, 4444}
    assert old_spi not in [pc for pc, _ in leases(pcscf)]


def test_create_flag_0x01_first_removes_tunnels_whose_contact_is_gone(pcscf):
    pending(pcscf)
    assert create(pcscf, pending(pcscf)) == 1
    pcscf.module.store.delete_contacts([contact_of(pcscf).id])  # the registrar forgot it
    age_leases(pcscf, 3600)
    reg = pending(pcscf, source=(OTHER_UE, 5060, "udp"))
    assert create(pcscf, reg, source=(OTHER_UE, 5060, "udp"), flags=m.CREATE_DELETE_UNUSED) == 1
    assert {s.dst for s in pcscf.kernel.sas.values()} == {PCSCF, OTHER_UE}
    assert UE not in {s.src for s in pcscf.kernel.sas.values()}
    assert len(leases(pcscf)) == 1


def test_create_without_flag_0x01_leaves_the_orphaned_tunnel(pcscf):
    assert create(pcscf, pending(pcscf)) == 1
    pcscf.module.store.delete_contacts([contact_of(pcscf).id])
    age_leases(pcscf, 3600)
    reg = pending(pcscf, source=(OTHER_UE, 5060, "udp"))
    assert create(pcscf, reg, source=(OTHER_UE, 5060, "udp")) == 1
    assert len(pcscf.kernel.sas) == 8 and len(leases(pcscf)) == 2


# -- ipsec_create: failures leave nothing behind ----------------------------------------------

def test_create_saves_the_contact_of_an_unprotected_register_itself(pcscf):
    """No save_pending before: the contact is written with its tunnel, in one transaction."""
    assert create(pcscf, register()) == 1
    c = contact_of(pcscf)
    assert (c.aor, c.state, c.uri) == (AOR, "pending", f"sip:alice@{UE}:5060")
    assert c.pending.security_server == KSR._rec.values("Security-Server")[0]


def test_create_for_a_register_without_contact_fails(pcscf):
    raw = register().replace(f"Contact: <sip:alice@{UE}:5060>;expires=600\r\n", "")
    assert create(pcscf, raw) == -1
    assert "without a contact" in "".join(KSR._rec.logs["err"])
    assert_nothing_left(pcscf)
    assert KSR._rec.added == [] and KSR._rec.removed == []


def test_create_without_security_client_fails(pcscf):
    reg = pending(pcscf, register(security_client=None))
    assert create(pcscf, reg) == -1
    assert "Security-Client" in "".join(KSR._rec.logs["err"])
    assert_nothing_left(pcscf)


@pytest.mark.parametrize(("ck", "ik"), [(None, IK), (CK, None), ("00", IK)])
def test_create_without_usable_ck_ik_fails(pcscf, ck, ik):
    reg = pending(pcscf)
    assert create(pcscf, reg, www=challenge(ck=ck, ik=ik)) == -1
    assert KSR._rec.logs["err"]
    assert_nothing_left(pcscf)
    assert KSR._rec.added == [] and KSR._rec.removed == []
    assert_no_keys_logged()


def test_create_without_www_authenticate_fails(pcscf):
    assert create(pcscf, pending(pcscf), www=None) == -1
    assert_nothing_left(pcscf)


def test_create_without_keys_does_not_blame_the_phone(pcscf):
    assert create(pcscf, pending(pcscf), www=challenge(ck=None)) == -1
    assert "phone" not in "".join(KSR._rec.logs["err"])


@pytest.mark.parametrize("offer", [
    "digest;d-alg=md5",
    "ipsec-3gpp;alg=hmac-sha-256;ealg=aes-cbc;spi-c=1;spi-s=2;port-c=31000;port-s=31001",
    "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;prot=ah;spi-c=1;spi-s=2;port-c=31000;port-s=31001",
    "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;spi-c=1111;spi-s=2222;port-c=31000",
    "ipsec-3gpp;alg=hmac-sha-1-96;spi-c=99999999999;spi-s=2;port-c=31000;port-s=31001",
])
def test_create_with_unusable_offer_fails(pcscf, offer):
    reg = pending(pcscf, register(security_client=offer))
    assert create(pcscf, reg) == -1
    assert KSR._rec.logs["err"]
    assert_nothing_left(pcscf)


def test_create_when_spi_leases_are_exhausted_fails_and_keeps_the_others(tmp_path):
    """Every pair held by a registered phone: a new phone's challenge is refused (a pair
    held by an unconfirmed contact would be taken from it instead: test_limits.py)."""
    p = Pcscf.start(str(tmp_path / "s.sqlite"), IPSEC_SPI_ID_START="4096", IPSEC_SPI_ID_RANGE="2")
    p.registered()
    first = dict(p.kernel.sas)
    reg = pending(p, source=(OTHER_UE, 5060, "udp"))
    assert create(p, reg, source=(OTHER_UE, 5060, "udp")) == -1
    assert "SpiExhausted" in "".join(KSR._rec.logs["err"])
    assert p.kernel.sas == first and leases(p) == [(4096, 4097)]
    assert contact_of(p, OTHER_UE).tunnel is None


@pytest.mark.parametrize("refused", range(8), ids=[f"request{i}" for i in range(8)])
def test_create_refused_by_the_kernel_leaves_nothing_behind(pcscf, refused):
    """Any one of the 4 SA adds or 4 policy adds refused: all rolled back, lease released."""
    adds = []

    def refuse(r: Request) -> int | None:
        if r.type in (k.XFRM_MSG_NEWSA, k.XFRM_MSG_NEWPOLICY):
            adds.append(r)
            return errno.EINVAL if len(adds) == refused + 1 else None
        return None

    pcscf.kernel.refuse = refuse
    reg = pending(pcscf)
    assert create(pcscf, reg) == -1
    assert "EINVAL" in "".join(KSR._rec.logs["err"])
    assert_nothing_left(pcscf)
    assert KSR._rec.values("Security-Server") == []
    assert_no_keys_logged()


def test_duplicate_spi_in_the_kernel_takes_the_next_lease(pcscf):
    foreign = codec.new_sa(_sa(PCSCF, 4096))
    assert pcscf.kernel.batch([foreign]) == [None]
    assert create(pcscf, pending(pcscf)) == 1
    (server,) = KSR._rec.values("Security-Server")
    assert int(server_param(server, "spi-c")) not in (4096, 4097)
    assert len(pcscf.kernel.sas) == 5 and (PCSCF, 4096) in pcscf.kernel.sas
    assert len(pcscf.kernel.states(user=MARKER)) == 4
    assert leases(pcscf) == [(int(server_param(server, "spi-c")), int(server_param(server, "spi-s")))]
    assert "already in the kernel" in "".join(KSR._rec.logs["warn"])


def test_duplicates_on_every_retry_give_up_with_nothing_leased(pcscf):
    pcscf.kernel.refuse = lambda r: errno.EEXIST if r.type == k.XFRM_MSG_NEWSA else None
    assert create(pcscf, pending(pcscf)) == -1
    assert "refused 3 SPI leases" in "".join(KSR._rec.logs["err"])
    assert_nothing_left(pcscf)


def test_store_failure_when_staging_installs_nothing(pcscf, mocker):
    """The contact vanished between the look-up and the staging (a sweep, another worker):
    the lease and stage transaction rolls back whole, and nothing reaches the kernel."""
    reg = pending(pcscf)
    mocker.patch.object(pcscf.module.store, "_save_binding", side_effect=UnknownContact("gone"))
    assert create(pcscf, reg) == -1
    assert_nothing_left(pcscf)


def _sa(dst: str, spi: int) -> SA:
    """An SA someone else (no marker) installed."""
    return SA(CORE, dst, spi, Selector(CORE, dst), esp_algs("hmac-md5-96", "null", bytes(16), bytes(16)))


# -- registrar steps --------------------------------------------------------------------------

def test_save_pending_records_the_contact(pcscf):
    pending(pcscf)
    c = contact_of(pcscf)
    assert (c.aor, c.state, c.uri, c.tunnel) == (AOR, "pending", f"sip:alice@{UE}:5060", None)


@pytest.mark.parametrize("contact", [None, "*"])
def test_save_pending_without_contact_fails(pcscf, contact):
    raw = register()
    raw = raw.replace(f"Contact: <sip:alice@{UE}:5060>;expires=600\r\n",
                      "" if contact is None else f"Contact: {contact}\r\n")
    KSR._load_request(raw)
    assert pcscf.module.save_pending(KsrMessage(), DOMAIN) == -1
    assert KSR._rec.logs["err"] and contact_of(pcscf) is None


def test_save_registers_for_the_granted_expiry(pcscf):
    pcscf.registered(expires=600)
    c = contact_of(pcscf)
    assert c.state == "registered" and c.expires == pytest.approx(pcscf.clock.now + 600, abs=1)


def test_save_takes_the_expiry_of_this_contact_among_all_bindings(pcscf):
    server = pcscf.registered(expires=600)
    reg = register(security_verify=server, via=f"{UE}:{PORT_UC}", cseq=5)
    relay = pcscf.request(reg, source=(UE, PORT_UC, "udp"),
                          local=(PCSCF, int(server_param(server, "port-s")))).relays[0]
    pcscf.register_reply(relay, reply_to(reg, 200, "OK", (
        "Contact: <sip:alice@10.0.0.77:5060>;expires=100",
        f"Contact: <sip:alice@{UE}:5060>;expires=600")))
    assert contact_of(pcscf).expires == pytest.approx(pcscf.clock.now + 600, abs=1)


def test_save_without_contact_fails(pcscf):
    reg = register()
    KSR._load_reply(reply_to(reg, 200, "OK"), reg)
    assert pcscf.module.save(KsrMessage(), DOMAIN) == -1


def _protected(server: str, verify: str | None, method: str = "REGISTER"):
    raw = (register(security_verify=verify, via=f"{UE}:{PORT_UC}") if method == "REGISTER" else
           request(method, "sip:bob@ims.example", via=f"{UE}:{PORT_UC}",
                   extra=(f"Security-Verify: {verify}",) if verify else ()))
    KSR._load_request(raw, (UE, PORT_UC, "udp"), (PCSCF, int(server_param(server, "port-s"))))
    return KsrMessage()


def _verify(mod: m.Module, msg: KsrMessage, required: bool) -> int:
    """As the routing calls it: with the contact whose SAs the request came through."""
    return mod.check_security_verify(msg, mod.tunnel_contact(msg), required)


def test_security_verify_must_repeat_security_server(pcscf):
    server = pcscf.registered()
    mod = pcscf.module
    reordered = ";".join(reversed(server.split(";")[1:]))
    assert _verify(mod, _protected(server, "ipsec-3gpp;" + reordered), True) == 1
    assert _verify(mod, _protected(server, server.replace("spi-c=", "spi-c=9")), True) == -1
    assert _verify(mod, _protected(server, None), True) == -1
    assert "missing" in "".join(KSR._rec.logs["err"])
    assert _verify(mod, _protected(server, None, "INVITE"), False) == 1
    assert _verify(mod, _protected(server, "garbage", "INVITE"), False) == -1


def test_a_protected_request_from_an_unknown_source_is_refused(pcscf):
    server = pcscf.registered()
    raw = register(security_verify=server)
    local = (PCSCF, int(server_param(server, "port-s")))
    KSR._load_request(raw, (OTHER_UE, PORT_UC, "udp"), local)
    assert pcscf.module.tunnel_contact(KsrMessage()) is None
    rec = pcscf.request(raw, source=(OTHER_UE, PORT_UC, "udp"), local=local)
    assert [(r.code, r.reason) for r in rec.replies] == [(403, "Forbidden - No Tunnel")]
    assert rec.relays == [] and "unknown tunnel" in rec.log_text()


# -- ipsec_destroy / ipsec_destroy_by_contact -----------------------------------------------------

def _core_request(ruri: str = "sip:bob@ims.example") -> KsrMessage:
    KSR._load_request(request("NOTIFY", ruri, via=f"{CORE}:5060"), (CORE, 5060, "udp"))
    return KsrMessage()


def test_destroy_by_aor_in_a_request_removes_everything_now(pcscf):
    pcscf.registered()
    assert pcscf.module.ipsec_destroy(_core_request(), DOMAIN, AOR) == 1
    assert pcscf.kernel.sas == {} and pcscf.kernel.policies_by_id == {}
    assert leases(pcscf) == [] and contact_of(pcscf) is None


def test_destroy_without_aor_uses_the_request_uri(pcscf):
    pcscf.registered()
    assert pcscf.module.ipsec_destroy(_core_request(f"sip:alice@{UE}:5060"), DOMAIN) == 1
    assert pcscf.kernel.sas == {} and contact_of(pcscf) is None


def test_destroy_of_every_contact_of_an_aor(pcscf):
    pcscf.registered()
    pcscf.registered(ue=OTHER_UE)
    assert len(pcscf.kernel.sas) == 8
    assert pcscf.module.ipsec_destroy(_core_request(), DOMAIN, AOR) == 1
    assert pcscf.kernel.sas == {} and leases(pcscf) == []


def test_destroy_of_unknown_aor_fails_and_removes_nothing(pcscf):
    pcscf.registered()
    assert pcscf.module.ipsec_destroy(_core_request(), DOMAIN, "sip:nobody@ims.example") == -1
    assert KSR._rec.logs["err"] and len(pcscf.kernel.sas) == 4


def test_destroy_on_a_reply_waits_for_the_sweep(pcscf):
    server = pcscf.registered()
    reg = register(security_verify=server, via=f"{UE}:{PORT_UC}", expires=0, cseq=9)
    relay = pcscf.request(reg, source=(UE, PORT_UC, "udp"),
                          local=(PCSCF, int(server_param(server, "port-s")))).relays[0]
    KSR._load_reply(reply_to(reg, 200, "OK"), relay)
    assert pcscf.module.ipsec_destroy(KsrMessage(), DOMAIN) == 1
    assert len(pcscf.kernel.sas) == 4  # the 200 OK still has to leave through them
    assert pcscf.module.sweep() == 1 and len(pcscf.kernel.sas) == 4
    pcscf.clock.advance(m.DEFERRED_TEARDOWN + 0.5)
    assert pcscf.module.sweep() == 1
    assert pcscf.kernel.sas == {} and leases(pcscf) == [] and contact_of(pcscf) is None


def test_destroy_by_contact(pcscf):
    pcscf.registered()
    mod = pcscf.module
    assert mod.ipsec_destroy_by_contact(_core_request(), DOMAIN, AOR, UE, 5061) == -1
    assert len(pcscf.kernel.sas) == 4
    assert mod.ipsec_destroy_by_contact(_core_request(), DOMAIN, AOR, UE, "5060") == 1
    assert pcscf.kernel.sas == {} and leases(pcscf) == [] and contact_of(pcscf) is None


# -- sweep and start-up -------------------------------------------------------------------------

def test_sweep_removes_expired_registrations_after_the_grace(pcscf):
    pcscf.registered(expires=60)
    pcscf.registered(ue=OTHER_UE, expires=3600)
    pcscf.clock.advance(60 + pcscf.module.expiry_grace - 1)
    assert pcscf.module.sweep() == 1 and len(pcscf.kernel.sas) == 8
    pcscf.clock.advance(2)
    assert pcscf.module.sweep() == 1
    assert {s.src for s in pcscf.kernel.sas.values()} == {PCSCF, OTHER_UE}
    assert contact_of(pcscf) is None and contact_of(pcscf, OTHER_UE) is not None


def test_sweep_resets_leases_when_nobody_is_left(pcscf):
    pcscf.registered(expires=60)
    pcscf.clock.advance(3600)
    assert pcscf.module.sweep() == 1
    assert pcscf.kernel.sas == {} and leases(pcscf) == []


def test_sweep_errors_are_logged_not_raised(pcscf, mocker):
    mocker.patch.object(pcscf.module.store, "expired", side_effect=OSError("disk gone"))
    assert pcscf.module.sweep() == -1
    assert "disk gone" in "".join(KSR._rec.logs["err"])


def test_startup_keeps_live_tunnels_and_flushes_strays(pcscf):
    pcscf.registered()
    live_sas, live_pols = dict(pcscf.kernel.sas), dict(pcscf.kernel.policies_by_id)
    stray = pcscf.module._kernel_tunnel(PCSCF, UeSide(OTHER_UE, 5111, 5222, 41000, 41001),
                                        Lease(9000, 9001, 5101, 5201), "hmac-md5-96", "null")
    tunnel.install(pcscf.kernel, stray)
    foreign = codec.new_sa(_sa(PCSCF, 777))
    pcscf.kernel.batch([foreign])
    pcscf.module.startup()
    assert {key: s for key, s in pcscf.kernel.sas.items() if s.sel.user == MARKER} == live_sas
    assert pcscf.kernel.policies_by_id == live_pols
    assert (PCSCF, 777) in pcscf.kernel.sas  # not ours: never touched


def test_startup_without_live_tunnels_flushes_all_of_ours(pcscf):
    pcscf.registered()
    pcscf.module.store.delete_contacts([contact_of(pcscf).id])
    pcscf.kernel.batch([codec.new_sa(_sa(PCSCF, 777))])
    pcscf.module.startup()
    assert pcscf.kernel.states(user=MARKER) == [] and pcscf.kernel.policies(user=MARKER) == []
    assert list(pcscf.kernel.sas) == [(PCSCF, 777)]


def test_startup_loads_every_pair_we_negotiate_then_removes_the_probes(pcscf):
    """One throw-away SA per valid pair (the kernel loads its ESP and crypto modules then,
    not while the first phones wait), deleted in the same start-up."""
    added = []
    pcscf.kernel.refuse = lambda r: added.append(r.what) if r.type == k.XFRM_MSG_NEWSA else None
    pcscf.module.startup()
    assert {(sa.algs.auth, sa.algs.crypt, sa.algs.aead) for sa in added} == {
        (a.auth, a.crypt, a.aead) for a in (esp_algs(alg, ealg, bytes(16), bytes(16))
                                           for alg, ealg in VALID_PAIRS)}
    assert {sa.dst for sa in added} == {"127.0.0.1"}  # no IPv6 listen address here
    assert pcscf.kernel.sas == {}


def test_a_pair_the_kernel_refuses_at_start_is_reported_and_start_goes_on(pcscf):
    pcscf.kernel.refuse = lambda r: errno.ENOSYS if (
        r.type == k.XFRM_MSG_NEWSA and r.what.algs.crypt is not None
        and r.what.algs.crypt.name == "cbc(des3_ede)") else None
    pcscf.module.startup()
    warned = "".join(KSR._rec.logs["warn"])
    assert "des-ede3-cbc" in warned and warned.count("refuses") == 2  # with md5 and sha1
    assert pcscf.kernel.sas == {}


def test_startup_drops_a_live_tunnel_the_kernel_lost(pcscf):
    pcscf.registered()
    spi_pc = contact_of(pcscf).tunnel.lease.spi_pc
    del pcscf.kernel.sas[(PCSCF, spi_pc)]
    pcscf.module.startup()
    assert pcscf.kernel.sas == {} and pcscf.kernel.policies_by_id == {}
    assert contact_of(pcscf).tunnel is None and leases(pcscf) == []
    assert "register again" in "".join(KSR._rec.logs["err"])


def test_rekey_keeps_the_old_sas_until_a_register_comes_through_the_new_ones(pcscf):
    """33.203 7.4: the 401 of a re-registration offers new SAs; the old ones carry the phone's
    traffic until its REGISTER arrives through the new ones, whose 200 OK retires the old."""
    old_server = pcscf.registered()
    old = contact_of(pcscf).tunnel
    old_ps = int(server_param(old_server, "port-s"))
    new_offer = OFFER.replace(f"port-c={PORT_UC}", "port-c=32000").replace("spi-c=1111", "spi-c=7777") \
        .replace("spi-s=2222", "spi-s=8888")
    rereg = register(via=f"{UE}:{PORT_UC}", security_client=new_offer, security_verify=old_server,
                     cseq=3)
    rec = pcscf.request(rereg, source=(UE, PORT_UC, "udp"), local=(PCSCF, old_ps))
    rec = pcscf.register_reply(rec.relays[0], reply_to(rereg, 401, "Unauthorized", (
        f"WWW-Authenticate: {challenge(ck='11' * 16)}",)))
    new_server = rec.values("Security-Server")[0]
    assert len(pcscf.kernel.sas) == 8  # both SA sets while the phone switches
    c = contact_of(pcscf)
    assert c.tunnel == old and c.pending.security_server == new_server
    # a request through the old SAs still finds its phone
    KSR._load_request(request("MESSAGE", "sip:bob@ims.example", via=f"{UE}:{PORT_US}"),
                      (UE, PORT_UC, "udp"), (PCSCF, old_ps))
    assert _verify(pcscf.module, KsrMessage(), required=False) == 1
    # the REGISTER through the new SAs, and its 200 OK
    new_ps = int(server_param(new_server, "port-s"))
    final = register(via=f"{UE}:32000", security_client=new_offer, security_verify=new_server,
                     cseq=4)
    rec = pcscf.request(final, source=(UE, 32000, "udp"), local=(PCSCF, new_ps))
    pcscf.register_reply(rec.relays[0], reply_to(final, 200, "OK", (
        f"Contact: <sip:alice@{UE}:5060>;expires=600",)))
    c = contact_of(pcscf)
    assert c.tunnel.security_server == new_server and c.pending is None
    assert len(pcscf.kernel.sas) == 4 and (PCSCF, old.lease.spi_pc) not in pcscf.kernel.sas
    assert leases(pcscf) == [(c.tunnel.lease.spi_pc, c.tunnel.lease.spi_ps)]


def test_a_register_through_the_pending_sas_confirms_them_even_when_challenged_again(pcscf):
    """The S-CSCF challenges again a REGISTER that came through the pending SAs: the phone has
    switched to them (33.203 7.4), so they become the ones in use and the old ones go; the new
    401 leaves through them, and the third SA set needs no third port pair."""
    old_server = pcscf.registered()
    old = contact_of(pcscf).tunnel
    old_ps = int(server_param(old_server, "port-s"))

    def challenged(offer_port: int, spi: int, verify: str, source_port: int, local_port: int,
                   ck: str) -> str:
        offer = OFFER.replace(f"port-c={PORT_UC}", f"port-c={offer_port}") \
            .replace("spi-c=1111", f"spi-c={spi}").replace("spi-s=2222", f"spi-s={spi + 1}")
        reg = register(via=f"{UE}:{source_port}", security_client=offer, security_verify=verify,
                       cseq=spi)
        rec = pcscf.request(reg, source=(UE, source_port, "udp"), local=(PCSCF, local_port))
        rec = pcscf.register_reply(rec.relays[0], reply_to(reg, 401, "Unauthorized", (
            f"WWW-Authenticate: {challenge(ck=ck * 16)}",)))
        assert rec.values("Security-Server"), rec.log_text()
        return rec.values("Security-Server")[0]

    first = challenged(32000, 7000, old_server, PORT_UC, old_ps, "11")
    confirmed = contact_of(pcscf).pending
    second = challenged(33000, 8000, first, 32000, int(server_param(first, "port-s")), "22")
    c = contact_of(pcscf)
    assert c.tunnel == confirmed and c.pending.security_server == second
    assert (PCSCF, confirmed.lease.spi_pc) in pcscf.kernel.sas  # the 401 leaves through these
    assert (PCSCF, old.lease.spi_pc) not in pcscf.kernel.sas and len(pcscf.kernel.sas) == 8
    assert sorted(leases(pcscf)) == sorted(
        [(t.lease.spi_pc, t.lease.spi_ps) for t in (c.tunnel, c.pending)])
