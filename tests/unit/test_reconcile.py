"""Start-up reconciliation (ipsec/reconcile.py through Module.startup): a live tunnel is kept
only when the kernel holds its 4 SAs AND 4 policies exactly; dropping one never takes what a
kept tunnel holds on the same flows; a partial dump is an error, never a reason to delete."""
from __future__ import annotations

import errno
from dataclasses import replace

import pytest

import KSR
from ipsec import module as m
from ipsec import tunnel
from ipsec.algorithms import esp_algs
from ipsec.sipuri import Address
from ipsec.tunnel import MARKER
from ipsec.xfrm import Dir, Xfrm, XfrmError, codec
from ipsec.xfrm import client as xfrm_client
from scenario import UE, FakeKernel


def contact_of(p):
    return p.module.store.find_by_received(Address(UE, 5060, "udp"))


def leases(p) -> list[tuple]:
    return p.module.store._db().execute("SELECT spi_pc FROM tunnels").fetchall()


def errors() -> str:
    return "".join(KSR._rec.logs["err"])


def ours(p) -> tuple[dict, dict]:
    return ({key: s for key, s in p.kernel.sas.items() if s.sel.user == MARKER},
            {key: pol for key, pol in p.kernel.policies_by_id.items() if pol.sel.user == MARKER})


def assert_dropped(p) -> None:
    assert ours(p) == ({}, {})
    assert contact_of(p).tunnel is None and leases(p) == []
    assert "dropped, its phone must register again" in errors()


def test_a_live_tunnel_whose_policies_are_gone_is_dropped(pcscf):
    """A kill between the SA batch and the policy batch: the SAs alone must not pass for a
    protected phone (the kernel would accept its cleartext)."""
    pcscf.registered()
    pcscf.kernel.policies_by_id.clear()
    pcscf.module.startup()
    assert_dropped(pcscf)
    assert "policy in missing" in errors() and "policy out missing" in errors()


def test_a_live_tunnel_with_one_policy_naming_other_sas_is_dropped(pcscf):
    pcscf.registered()
    key, pol = next((key, p) for key, p in pcscf.kernel.policies_by_id.items() if p.dir == Dir.IN)
    pcscf.kernel.policies_by_id[key] = replace(pol, templates=(replace(pol.templates[0], reqid=1),))
    pcscf.module.startup()
    assert_dropped(pcscf)
    assert "template(s)" in errors()


def test_a_live_tunnel_with_an_sa_of_other_algorithms_is_dropped(pcscf):
    pcscf.registered()
    key, sa = next(iter(pcscf.kernel.sas.items()))
    pcscf.kernel.sas[key] = replace(sa, auth="hmac(md5)")
    pcscf.module.startup()
    assert_dropped(pcscf)
    assert "auth hmac(md5), expected hmac(sha1)" in errors()


def test_a_whole_live_tunnel_is_kept_as_it_is(pcscf):
    pcscf.registered()
    before = ours(pcscf)
    pcscf.module.startup()
    assert ours(pcscf) == before and contact_of(pcscf).tunnel is not None
    assert "kept 1 live tunnel(s), dropped 0, removed 0 stray SA(s) and 0 stray" in "".join(
        KSR._rec.logs["info"])


def test_dropping_a_tunnel_leaves_the_policies_a_kept_tunnel_holds_on_its_flows(pcscf):
    """Two live tunnels on the same addresses and ports (a store restored from an old copy,
    phones reusing addresses and ports): the kernel holds one policy per flow, the kept
    tunnel's. The other, missing an SA, is dropped; the kept tunnel's policies stay (removal
    by selector would have taken them: SAs and no policies, the issue's 800/788)."""
    pcscf.registered()
    db = pcscf.module.store._db()
    row = db.execute("SELECT * FROM tunnels").fetchone()
    cols = [d[0] for d in db.execute("SELECT * FROM tunnels").description]
    other = dict(zip(cols, row), id=None, spi_pc=9000, spi_ps=9001, spi_uc=7001, spi_us=7002)
    del other["id"]
    db.execute(f"INSERT INTO tunnels ({','.join(other)}) VALUES ({','.join('?' * len(other))})",
               tuple(other.values()))
    new_id = db.execute("SELECT id FROM tunnels WHERE spi_pc = 9000").fetchone()[0]
    contact = contact_of(pcscf)
    db.execute("INSERT INTO contacts (aor, uri, contact_host, contact_port, via_host, via_port,"
               " via_proto, received_host, received_port, received_proto, state, expires,"
               " tunnel_id) SELECT 'sip:old@ims.test', uri, contact_host, contact_port, via_host,"
               " via_port, via_proto, received_host, received_port, received_proto, state,"
               " expires, ? FROM contacts WHERE id = ?", (new_id, contact.id))
    stale = next(t for t in pcscf.module.store.live_tunnels() if t.lease.spi_pc == 9000)
    spec = pcscf.module._spec_of(stale)
    sas = tunnel.sas(spec, esp_algs(stale.alg, stale.ealg, bytes(16), bytes(16)))
    pcscf.kernel.batch([codec.new_sa(sa) for sa in sas[:3]])  # its SA4 is gone
    kept_before = dict(ours(pcscf)[1])
    pcscf.module.startup()
    sas_after, pols_after = ours(pcscf)
    assert pols_after == kept_before, "the kept tunnel lost policies"
    assert {spi for _, spi in sas_after} == {contact.tunnel.lease.spi_pc, contact.tunnel.lease.spi_ps,
                                             contact.tunnel.ue.spi_uc, contact.tunnel.ue.spi_us}
    assert pcscf.module.store.get_contact(contact.id).tunnel is not None
    assert [r[0] for r in leases(pcscf)] == [contact.tunnel.lease.spi_pc]


def test_the_sweep_removing_a_stale_lease_leaves_a_live_tunnels_policies_on_the_same_flows(
        pcscf):
    """A lease no contact uses, whose tunnel has the addresses and ports of a live one (its
    install was refused, or its worker died before releasing it): the sweep removes it, and
    the live tunnel keeps its 4 policies (removal by selector took them: SAs, no policies)."""
    pcscf.registered()
    pcscf.module.sweep()  # its kernel lifetime renewed
    db = pcscf.module.store._db()
    cur = db.execute("SELECT * FROM tunnels")
    row = dict(zip([d[0] for d in cur.description], cur.fetchone()))
    del row["id"]
    row.update(spi_pc=9000, spi_ps=9001, spi_uc=7001, spi_us=7002, leased_at=row["leased_at"] - 3600)
    db.execute(f"INSERT INTO tunnels ({','.join(row)}) VALUES ({','.join('?' * len(row))})",
               tuple(row.values()))
    before = ours(pcscf)
    pcscf.clock.advance(120)
    assert pcscf.module.sweep() == 1
    assert ours(pcscf) == before
    assert [r[0] for r in leases(pcscf)] == [contact_of(pcscf).tunnel.lease.spi_pc]


class _KernelThatInterruptsDumps(FakeKernel):
    def states(self, user=None):
        raise XfrmError("dump", errno.EINTR, "SAs", "interrupted 5 times")


def test_a_partial_dump_stops_the_start_and_deletes_nothing(pcscf):
    pcscf.registered()
    kernel = _KernelThatInterruptsDumps()
    kernel.sas, kernel.policies_by_id = pcscf.kernel.sas, pcscf.kernel.policies_by_id
    before = ours(pcscf)
    pcscf.module.xfrm = kernel
    with pytest.raises(m.ModuleError, match="interrupted"):
        pcscf.module.startup()
    assert ours(pcscf) == before and contact_of(pcscf).tunnel is not None


@pytest.mark.parametrize("what", ["states", "policies"])
def test_the_netlink_door_raises_after_interrupted_dumps_instead_of_answering_part(
        monkeypatch, what):
    """NLM_F_DUMP_INTR on every attempt: the table kept changing; what came back may lack
    entries, so it is never returned as the answer."""
    calls = []

    def interrupted(self, msg_type, decode, user):
        calls.append(msg_type)
        return ["partial"], True

    monkeypatch.setattr(xfrm_client.Xfrm, "_dump_once", interrupted)
    with pytest.raises(XfrmError, match="interrupted 5 times"):
        getattr(Xfrm(), what)(user=MARKER)
    assert len(calls) == xfrm_client.DUMP_ATTEMPTS


def test_flush_still_acts_on_interrupted_dumps_until_none_is_left(monkeypatch):
    """A flush deletes whatever each dump found and dumps again until nothing is left: an
    interrupted dump is enough for it."""
    class Found:
        id = "policy"

    answers = iter([([Found()], True)] * 5 + [([], False)] + [([], False)])
    monkeypatch.setattr(xfrm_client.Xfrm, "_dump_once", lambda self, t, d, u: next(answers))
    monkeypatch.setattr(xfrm_client.Xfrm, "batch", lambda self, reqs: [None] * len(reqs))
    monkeypatch.setattr(xfrm_client.codec, "del_policy", lambda pid: pid)
    assert Xfrm().flush(MARKER).policies == 1

