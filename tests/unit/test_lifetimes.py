"""Kernel hard lifetimes (ipsec/lifetimes.py): the values computed, and what the module gives
the kernel at the 401, at the 200 OK and at each refresh (fake kernel; the real kernel's
behaviour is in tests/kernel/test_lifetime_expiry.py)."""
from __future__ import annotations

import errno
import math
from dataclasses import replace

import pytest

import KSR
from ipsec import lifetimes, renewals
from ipsec.params import ParamError
from ipsec.sipuri import Address
from ipsec.store import UeLocks
from ipsec.xfrm import structs as k
from scenario import (OFFER, PCSCF, PORT_UC, UE, Pcscf, challenge, register, reply_to,
                      server_param)

EXPIRES, GRACE, PENDING, MARGIN = 600, 30, 30, lifetimes.MARGIN


def test_values():
    assert lifetimes.pending_seconds(30, 60) == 90
    assert lifetimes.pending_seconds(30.2, 0) == 31
    assert lifetimes.registered_deadline(1000.0, 30, 60) == 1090.0
    # counted from the entry's add_time, never ending earlier than a second from now
    assert lifetimes.seconds(1090.0, added=1000.0, now=1010.0) == 90
    assert lifetimes.seconds(1090.4, added=1000.0, now=1010.0) == 91
    assert lifetimes.seconds(1090.0, added=1000.0, now=2000.0) == 1001


def test_margin_define():
    assert lifetimes.margin_from("") == MARGIN and lifetimes.margin_from("5") == 5.0
    for bad in ("0", "x", "86401"):
        with pytest.raises(ParamError):
            lifetimes.margin_from(bad)


def _hards(p: Pcscf) -> tuple[set[int], set[int]]:
    return ({s.hard for s in p.kernel.sas.values()},
            {pol.hard for pol in p.kernel.policies_by_id.values()})


def _contact(p: Pcscf):
    return p.module.store.find_by_received(Address(UE, 5060, "udp"))


def test_the_401_gives_the_pending_lifetime_and_margin(pcscf):
    reg = register()
    rec = pcscf.request(reg)
    pcscf.register_reply(rec.relays[0], reply_to(reg, 401, "Unauthorized", (
        f"WWW-Authenticate: {challenge()}",)))
    assert len(pcscf.kernel.sas) == 4
    assert _hards(pcscf) == ({PENDING + MARGIN}, {PENDING + MARGIN})


class _Counting:
    """Counts the netlink round trips asked of the fake kernel (look-ups and batches)."""

    def __init__(self, kernel) -> None:
        self.kernel, self.trips = kernel, 0
        self._batch, self._look_up = kernel.batch, kernel.look_up
        kernel.batch, kernel.look_up = self.batch, self.look_up

    def batch(self, requests):
        self.trips += bool(requests)  # an empty batch sends nothing
        return self._batch(requests)

    def look_up(self, sa_ids, policy_ids):
        self.trips += bool(sa_ids or policy_ids)
        return self._look_up(sa_ids, policy_ids)


def test_the_200_ok_asks_and_the_sweep_moves_the_lifetime_to_expiry_grace_and_margin(pcscf):
    pcscf.clock.now = float(int(pcscf.clock.now))  # whole seconds, as the kernel's add_time
    server = pcscf.registered(expires=EXPIRES)
    assert _hards(pcscf) == ({PENDING + MARGIN}, {PENDING + MARGIN})  # until the sweep
    counting = _Counting(pcscf.kernel)
    assert pcscf.module.sweep() == 1 and counting.trips == 2  # one look-up, one update batch
    added = {s.add_time for s in pcscf.kernel.sas.values()}
    assert len(added) == 1
    (added,) = added
    want = lifetimes.registered_deadline(_contact(pcscf).expires, GRACE, MARGIN)
    assert _hards(pcscf) == ({round(want - added)}, {round(want - pcscf.clock())})
    assert round(want - added) == EXPIRES + GRACE + MARGIN  # the fake clock did not move
    assert pcscf.module.sweep() == 1 and counting.trips == 2  # served once: nothing asked now
    pcscf.clock.advance(400)
    pcscf.refreshed(server, cseq=10)
    assert counting.trips == 2  # the 200 OK of a refresh asks nothing of the kernel
    pcscf.module.sweep()
    want = lifetimes.registered_deadline(_contact(pcscf).expires, GRACE, MARGIN)
    sas, pols = _hards(pcscf)
    # SAs keep their add_time: 400 s since it, plus the whole new registration
    assert sas == {400 + EXPIRES + GRACE + MARGIN}
    assert {s.add_time for s in pcscf.kernel.sas.values()} == {added}
    # policies are replaced: counted from now
    assert pols == {EXPIRES + GRACE + MARGIN}
    assert len(pcscf.kernel.policies_by_id) == 4 and want - added == 400 + EXPIRES + GRACE + MARGIN


def test_one_sweep_renews_many_phones_in_two_round_trips_per_chunk(tmp_path):
    pcscf = Pcscf.start(str(tmp_path / "ipsec.sqlite"), IPSEC_SPI_ID_RANGE="400")
    pcscf.clock.now = float(int(pcscf.clock.now))
    phones = [f"10.0.1.{n}" for n in range(1, renewals.CHUNK + 7)]
    for ue in phones:
        pcscf.registered(ue=ue, expires=EXPIRES)
    counting = _Counting(pcscf.kernel)
    pcscf.module.sweep()
    assert counting.trips == 4  # a chunk of CHUNK phones, then one of 6
    deadline = {round(lifetimes.registered_deadline(c.expires, GRACE, MARGIN) - pcscf.clock())
                for ue in phones
                for c in pcscf.module.store.find_by_aor("sip:alice@ims.example")
                if c.received.host == ue}
    assert _hards(pcscf) == (deadline, deadline) and len(pcscf.kernel.sas) == 4 * len(phones)
    pcscf.module.store.close()


def test_a_refresh_while_the_sweep_renews_is_renewed_at_the_next_sweep(pcscf, monkeypatch):
    """The worker's 200 OK does not take the phone's lock: a refresh that lands between the
    sweep's read and its delete asks again (its seq moved), and its request is not lost."""
    pcscf.clock.now = float(int(pcscf.clock.now))
    pcscf.registered(expires=EXPIRES)
    c = _contact(pcscf)
    real = renewals.kernel.renew_all

    def refresh_meanwhile(x, wanted, now, **kw):
        done = real(x, wanted, now, **kw)
        pcscf.module.store.register(c.id, pcscf.clock() + 3000, uri=c.uri, received=c.received,
                                    through=None)
        return done

    monkeypatch.setattr(renewals.kernel, "renew_all", refresh_meanwhile)
    pcscf.module.sweep()
    monkeypatch.setattr(renewals.kernel, "renew_all", real)
    assert _hards(pcscf)[1] == {EXPIRES + GRACE + MARGIN}  # what the sweep read
    pcscf.module.sweep()
    assert _hards(pcscf)[1] == {3000 + GRACE + MARGIN}  # what the refresh asked


def test_a_refused_renewal_is_logged_and_tried_again(pcscf):
    pcscf.clock.now = float(int(pcscf.clock.now))
    server = pcscf.registered()
    pcscf.module.sweep()
    before = _hards(pcscf)
    pcscf.kernel.refuse = lambda r: errno.ENOBUFS if r.type == k.XFRM_MSG_UPDSA else None
    pcscf.clock.advance(100)
    pcscf.refreshed(server, cseq=11, expires=1200)
    assert _contact(pcscf).expires == pytest.approx(pcscf.clock() + 1200)
    pcscf.module.sweep()
    assert "not renewed" in "".join(KSR._rec.logs["err"])
    assert "key" not in "".join(KSR._rec.logs["err"]).lower()
    assert _hards(pcscf)[0] == before[0]  # the SAs kept their lifetime
    pcscf.kernel.refuse = lambda r: None
    pcscf.module.sweep()  # the request stayed
    assert _hards(pcscf)[0] == {100 + 1200 + GRACE + MARGIN}


def test_a_sweep_that_cannot_reach_the_kernel_keeps_the_requests(pcscf):
    pcscf.clock.now = float(int(pcscf.clock.now))
    pcscf.registered()

    def broken(*_):
        raise OSError(errno.ENOBUFS, "No buffer space available")

    real, pcscf.kernel.look_up = pcscf.kernel.look_up, broken
    assert pcscf.module.sweep() == 1  # the rest of the sweep still ran
    assert "kernel lifetimes not renewed" in "".join(KSR._rec.logs["err"])
    assert _hards(pcscf) == ({PENDING + MARGIN}, {PENDING + MARGIN})
    pcscf.kernel.look_up = real
    pcscf.module.sweep()
    assert _hards(pcscf)[0] == {600 + GRACE + MARGIN}


def test_renewing_a_tunnel_the_kernel_lost_is_a_warning(pcscf):
    server = pcscf.registered()
    spi = _contact(pcscf).tunnel.lease.spi_pc
    del pcscf.kernel.sas[(PCSCF, spi)]
    pcscf.refreshed(server, cseq=12)
    pcscf.module.sweep()
    assert "1 piece(s) not in the kernel" in "".join(KSR._rec.logs["warn"])
    assert len(pcscf.kernel.sas) == 3  # nothing re-created


def test_a_contact_gone_before_the_sweep_leaves_no_request(pcscf):
    pcscf.registered()
    c = _contact(pcscf)
    pcscf.module.store.delete_contacts([c.id])
    assert pcscf.module.store.renewals_due(10) == []


def test_pending_sas_that_a_challenged_register_came_through_get_the_registrations_lifetime(
        pcscf):
    """A REGISTER through the pending SAs that the core challenges again: they serve from
    now on (promoted at the 401), so they get the registration's lifetime, not the
    pending one they were installed with; the new pending SAs get the pending one."""
    pcscf.clock.now = float(int(pcscf.clock.now))
    old_server = pcscf.registered(expires=EXPIRES)

    def challenged(offer_port: int, spi: int, verify: str, source_port: int,
                   local_port: int) -> str:
        offer = OFFER.replace(f"port-c={PORT_UC}", f"port-c={offer_port}") \
            .replace("spi-c=1111", f"spi-c={spi}").replace("spi-s=2222", f"spi-s={spi + 1}")
        reg = register(via=f"{UE}:{source_port}", security_client=offer,
                       security_verify=verify, cseq=spi)
        rec = pcscf.request(reg, source=(UE, source_port, "udp"), local=(PCSCF, local_port))
        rec = pcscf.register_reply(rec.relays[0], reply_to(reg, 401, "Unauthorized", (
            f"WWW-Authenticate: {challenge(ck='11' * 16)}",)))
        return rec.values("Security-Server")[0]

    pcscf.clock.advance(10)  # the store leases on the real clock: not past PENDING_LIFETIME
    first = challenged(32000, 7000, old_server, PORT_UC, int(server_param(old_server, "port-s")))
    pcscf.clock.advance(5)
    challenged(33000, 8000, first, 32000, int(server_param(first, "port-s")))
    pcscf.module.sweep()
    c = _contact(pcscf)
    by_spi = {spi: s.hard for (_, spi), s in pcscf.kernel.sas.items()}
    deadline = lifetimes.registered_deadline(c.expires, GRACE, MARGIN)
    # installed at the first 401 (clock + 10), renewed at the second
    assert by_spi[c.tunnel.lease.spi_pc] == round(deadline - (pcscf.clock() - 5))
    assert by_spi[c.pending.lease.spi_pc] == PENDING + MARGIN


def test_the_sweep_renews_under_the_phones_lock(pcscf, monkeypatch):
    """A worker changing the phone's tunnels (ipsec_create holds the lock) must not remove a
    policy between the sweep's look-up and its update, which would add it back."""
    pcscf.registered()
    other = UeLocks(pcscf.module.locks.path)  # another open: another worker, as far as OFD goes
    seen: list[bool] = []
    real = renewals.kernel.renew_all

    def look(x, wanted, now, **kw):
        with other.try_held(UE) as got:
            seen.append(got)
        return real(x, wanted, now, **kw)

    monkeypatch.setattr(renewals.kernel, "renew_all", look)
    pcscf.module.sweep()
    with other.try_held(UE) as got:
        seen.append(got)
    other.close()
    assert seen == [False, True]


def test_a_rekeys_200_ok_retires_the_old_tunnel_under_the_phones_lock(pcscf, monkeypatch):
    """The sweep renews under the phone's lock; the re-key's 200 OK removes the old tunnel
    under it too, so the sweep's look-up and update never straddle that removal."""
    old_server = pcscf.registered(expires=EXPIRES)
    other = UeLocks(pcscf.module.locks.path)
    seen: list[bool] = []
    real = pcscf.module._remove_tunnels

    def remove(found):
        with other.try_held(UE) as got:
            seen.append(got)
        return real(found)

    monkeypatch.setattr(pcscf.module, "_remove_tunnels", remove)
    offer = OFFER.replace(f"port-c={PORT_UC}", "port-c=32000") \
        .replace("spi-c=1111", "spi-c=7000").replace("spi-s=2222", "spi-s=7001")
    reg = register(via=f"{UE}:{PORT_UC}", security_client=offer, security_verify=old_server,
                   cseq=5)
    rec = pcscf.request(reg, source=(UE, PORT_UC, "udp"),
                        local=(PCSCF, int(server_param(old_server, "port-s"))))
    rec = pcscf.register_reply(rec.relays[0], reply_to(reg, 401, "Unauthorized", (
        f"WWW-Authenticate: {challenge(ck='22' * 16)}",)))
    new_server = rec.values("Security-Server")[0]
    protected = register(via=f"{UE}:32000", security_client=offer, security_verify=new_server,
                         cseq=6)
    rec = pcscf.request(protected, source=(UE, 32000, "udp"),
                        local=(PCSCF, int(server_param(new_server, "port-s"))))
    pcscf.register_reply(rec.relays[0], reply_to(protected, 200, "OK", (
        f"Contact: <sip:alice@{UE}:5060>;expires={EXPIRES}",)))
    other.close()
    assert seen == [False]  # the old tunnel went, under the lock
    assert len(pcscf.kernel.sas) == 4


def test_the_sweep_looks_up_only_policies_and_counts_sas_from_their_lease(pcscf):
    """The SAs went in after their lease was taken: their lifetime is counted from the
    lease's second, so the sweep asks the kernel for no SA (a GETSA answer is the biggest
    message of a renewal); it still reads the policies (whose they are)."""
    pcscf.clock.now = float(int(pcscf.clock.now)) + 0.7
    pcscf.registered(expires=EXPIRES)
    asked: list[tuple[int, int]] = []
    real = pcscf.kernel.look_up

    def look_up(sa_ids, policy_ids):
        asked.append((len(sa_ids), len(policy_ids)))
        return real(sa_ids, policy_ids)

    pcscf.kernel.look_up = look_up
    pcscf.clock.advance(3)  # the sweep a little later: the SAs count from their own second
    pcscf.module.sweep()
    assert asked == [(0, 4)]
    c = _contact(pcscf)
    deadline = lifetimes.registered_deadline(c.expires, GRACE, MARGIN)
    ends = {s.add_time + s.hard for s in pcscf.kernel.sas.values()}
    assert ends == {math.ceil(deadline)} and deadline <= min(ends) < deadline + 1


def test_tunnels_kept_at_start_get_their_registrations_lifetime(pcscf):
    """A start keeps the live tunnels the kernel holds whole; those without a lifetime (put
    in before lifetimes existed) or with another one get the registration's at the first
    sweeps after it."""
    pcscf.clock.now = float(int(pcscf.clock.now))
    pcscf.registered(expires=EXPIRES)
    pcscf.module.sweep()
    for key, sa in list(pcscf.kernel.sas.items()):
        pcscf.kernel.sas[key] = replace(sa, hard=0)  # as an older version left them
    for key, pol in list(pcscf.kernel.policies_by_id.items()):
        pcscf.kernel.policies_by_id[key] = replace(pol, hard=0)
    pcscf.module.startup()
    assert len(pcscf.kernel.sas) == 4  # kept
    pcscf.module.sweep()
    assert _hards(pcscf) == ({EXPIRES + GRACE + MARGIN}, {EXPIRES + GRACE + MARGIN})


def test_a_burst_of_registrations_is_renewed_in_one_sweep_within_its_budget(tmp_path,
                                                                           monkeypatch):
    """More requests than one read (BATCH) are served in the same sweep while its time
    budget lasts, each once; with no budget left, the first read only, the rest next time."""
    pcscf = Pcscf.start(str(tmp_path / "ipsec.sqlite"), IPSEC_SPI_ID_RANGE="400")
    pcscf.clock.now = float(int(pcscf.clock.now))
    monkeypatch.setattr(renewals, "BATCH", 2)
    monkeypatch.setattr(renewals, "CHUNK", 1)
    for n in range(1, 6):
        pcscf.registered(ue=f"10.0.1.{n}", expires=EXPIRES)
    store = pcscf.module.store
    monkeypatch.setattr(renewals, "BUDGET", 0.0)
    pcscf.module.sweep()
    assert len(store.renewals_due(10)) == 3  # one read of 2 served
    monkeypatch.setattr(renewals, "BUDGET", 60.0)
    pcscf.module.sweep()
    assert store.renewals_due(10) == []
    assert _hards(pcscf) == ({EXPIRES + GRACE + MARGIN}, {EXPIRES + GRACE + MARGIN})
    pcscf.module.store.close()
