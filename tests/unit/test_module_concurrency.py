"""ipsec_create when challenges for one phone overlap: the store and the kernel must agree.

Two 401s reach the reply route for one phone when the core answers TM's retransmission of a
REGISTER (a stateless or slow S-CSCF: same transaction, maybe other keys), or when the phone
starts a new REGISTER before the last one was answered (another transaction, the same
Security-Client). In Kamailio they may run in two workers at once; here the second runs in a
thread with its own store connection and its own lock descriptor, like another process.
After each: every tunnel the store holds has exactly its SAs and policies in the kernel,
nothing else of ours is there, and the tunnel whose Security-Server went out is intact.
"""
from __future__ import annotations

import threading

import KSR
from ipsec import tunnel as kernel
from ipsec.algorithms import EspAlgs
from ipsec.module import Module
from ipsec.xfrm import structs as k
from kemi.message import KsrMessage
from scenario import (CK, CORE, DOMAIN, IK, UE, Pcscf, challenge, register, reply_to,
                      server_param)


def kernel_matches_store(p: Pcscf) -> None:
    """The invariant: the kernel holds exactly the SAs and policies of the store's tunnels."""
    rows = p.module.store._db().execute(
        "SELECT spi_pc FROM tunnels WHERE ue_host IS NOT NULL").fetchall()
    tunnels = [t for c in p.module.store.find_by_aor("sip:alice@ims.example")
               for t in (c.tunnel, c.pending) if t is not None]
    assert len({t.lease for t in tunnels}) == len(rows), "a staged tunnel no contact holds"
    want_sas, want_pols = set(), set()
    for t in tunnels:
        spec = p.module._spec_of(t)
        want_sas |= {(sa.dst, sa.spi) for sa in kernel.sas(spec, EspAlgs())}
        want_pols |= {(pol.dir, pol.sel) for pol in kernel.policies(spec)}
    assert set(p.kernel.sas) == want_sas
    assert set(p.kernel.policies_by_id) == want_pols


def pending(p: Pcscf, cseq: int = 1) -> str:
    raw = register(cseq=cseq)
    KSR._load_request(raw, (UE, 5060, "udp"))
    assert p.module.save_pending(KsrMessage(), DOMAIN) == 1
    return raw


def create(module: Module, reg: str, ck: str = CK, ik: str = IK) -> tuple[int, str | None]:
    """The 401 to `reg` through ipsec_create; returns its result and the Security-Server."""
    KSR._load_reply(reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge(ck, ik)}",)),
                    reg, source=(CORE, 5060, "udp"))
    result = module.ipsec_create(KsrMessage(), DOMAIN)
    servers = KSR._rec.values("Security-Server")
    return result, servers[0] if servers else None


def test_a_second_401_with_other_keys_to_the_same_register_keeps_the_first(pcscf):
    """A stateless core answers TM's retransmission with a fresh challenge: TM relays only the
    first 401; its tunnel must survive (before: EEXIST on the phone's SPIs, tunnel lost)."""
    reg = pending(pcscf)
    ok, first = create(pcscf.module, reg)
    assert ok == 1
    sent = pcscf.module.store.find_by_aor("sip:alice@ims.example")[0].pending
    assert create(pcscf.module, reg, ck="22" * 16, ik="33" * 16) == (-1, None)
    (c,) = pcscf.module.store.find_by_aor("sip:alice@ims.example")
    assert c.pending == sent and c.pending.security_server == first
    kernel_matches_store(pcscf)


def test_a_second_401_with_the_same_keys_gets_the_same_security_server(pcscf):
    """A stateful core retransmits its 401 unchanged: same SAs, same header (reuse off)."""
    pcscf.module.params = pcscf.module.params.__class__(
        **{**pcscf.module.params.__dict__, "ipsec_reuse_server_port": 0})
    reg = pending(pcscf)
    first = create(pcscf.module, reg)
    assert create(pcscf.module, reg) == first
    assert len(pcscf.kernel.sas) == 4
    kernel_matches_store(pcscf)


def test_a_new_register_with_the_same_offer_replaces_the_unused_pending_tunnel(pcscf):
    """The phone gave up on a challenge and sent a new REGISTER with the same Security-Client:
    only one SA per phone SPI can exist, so the unconfirmed tunnel goes before the new one."""
    first_reg = pending(pcscf, cseq=1)
    _, first = create(pcscf.module, first_reg)
    second_reg = pending(pcscf, cseq=2)
    ok, second = create(pcscf.module, second_reg, ck="22" * 16)
    assert ok == 1 and second != first
    (c,) = pcscf.module.store.find_by_aor("sip:alice@ims.example")
    assert c.pending.security_server == second
    assert len(pcscf.kernel.sas) == 4
    assert (pcscf.module._pcscf_host(UE), int(server_param(first, "spi-s"))) not in pcscf.kernel.sas
    kernel_matches_store(pcscf)


def test_a_late_401_to_an_abandoned_register_leaves_the_newer_tunnel(pcscf):
    """Two REGISTERs in flight, their 401s handled in the other order (two workers): the
    phone acts on the 401 to its latest REGISTER, so an earlier one's must not replace it."""
    first_reg = pending(pcscf, cseq=1)
    second_reg = pending(pcscf, cseq=2)
    ok, newer = create(pcscf.module, second_reg, ck="22" * 16)
    assert ok == 1
    assert create(pcscf.module, first_reg) == (-1, None)
    assert "earlier REGISTER" in KSR._rec.log_text()
    (c,) = pcscf.module.store.find_by_aor("sip:alice@ims.example")
    assert c.pending.security_server == newer
    kernel_matches_store(pcscf)


def test_the_phone_spis_of_a_tunnel_in_use_are_refused_and_nothing_changes(pcscf):
    """A re-registration must offer new SPIs (33.203 7.4); reusing those of the SAs in use
    cannot be served without breaking them: refused, the registration keeps working."""
    server = pcscf.registered()
    before = dict(pcscf.kernel.sas)
    reg = register(security_verify=server, via=f"{UE}:31000", cseq=7)
    KSR._load_reply(reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge('44' * 16)}",)),
                    reg, request_source=(UE, 31000, "udp"),
                    request_local=("10.0.0.1", int(server_param(server, "port-s"))),
                    source=(CORE, 5060, "udp"))
    assert pcscf.module.ipsec_create(KsrMessage(), DOMAIN) == -1
    assert "in use" in KSR._rec.log_text()
    assert pcscf.kernel.sas == before
    kernel_matches_store(pcscf)


def test_two_workers_challenging_one_phone_at_once_take_turns(pcscf):
    """Worker B's challenge arrives while worker A is between its SAs and its policies. With
    the phone's lock B waits; A's tunnel is complete when B replaces it; the two agree."""
    first_reg, second_reg = pending(pcscf, cseq=1), pending(pcscf, cseq=2)
    events: list[str] = []
    a_in_kernel, b_started = threading.Event(), threading.Event()
    result: dict[str, tuple[int, str | None]] = {}

    def refuse(request):
        who = threading.current_thread().name
        events.append(f"{who}:{request.type}")
        if who == "A" and request.type == k.XFRM_MSG_NEWPOLICY and not a_in_kernel.is_set():
            a_in_kernel.set()
            b_started.wait(5)
            threading.Event().wait(0.3)  # B has had every chance to get in
        return None

    pcscf.kernel.refuse = refuse
    defs = dict(KSR._defs)

    def worker(reg: str, ck: str) -> None:
        """A Kamailio worker: its own module (store connection, lock descriptor, message)."""
        KSR._defines(defs)
        module = Module.from_defines(KSR.kx.get_def, log=KSR)
        module.xfrm, module.clock = pcscf.kernel, pcscf.clock
        if threading.current_thread().name == "B":
            a_in_kernel.wait(5)
            b_started.set()
        try:
            result[threading.current_thread().name] = create(module, reg, ck=ck)
        finally:
            module.close()

    a = threading.Thread(target=worker, name="A", args=(first_reg, CK))
    b = threading.Thread(target=worker, name="B", args=(second_reg, "55" * 16))
    a.start()
    b.start()
    a.join(10)
    b.join(10)
    assert result["A"][0] == 1 and result["B"][0] == 1, result
    a_events = [e for e in events if e.startswith("A:")]
    last_a = events.index(a_events[-1])
    assert not [e for e in events[:last_a] if e.startswith("B:")], events  # B waited for A
    (c,) = pcscf.module.store.find_by_aor("sip:alice@ims.example")
    assert c.pending.security_server == result["B"][1]
    kernel_matches_store(pcscf)
