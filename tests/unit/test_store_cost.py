"""What a challenge costs in SQLite must not grow with the number of phones the store holds:
counted in SQLite virtual-machine instructions (a progress handler called at each one), not
in time, so that the test is the same on a busy machine."""
from __future__ import annotations

import time
from contextlib import contextmanager

import pytest

from ipsec import module
from scenario import Pcscf, challenge, register, reply_to

OFFER = ("ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;spi-c={s};spi-s={t};"
         "port-c=31000;port-s=31001")


def _held(p: Pcscf, n: int, registered: bool) -> None:
    """n phones, each on its own address: registered (a contact with its tunnel in use) or
    challenged and never back (a contact with only a pending tunnel: a flood of REGISTERs
    from many sources)."""
    now = time.time()
    with p.module.store._tx() as db:
        for i in range(n):
            host = f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
            (tid,) = db.execute(
                "INSERT INTO tunnels (spi_pc, spi_ps, port_pc, port_ps, port_index, leased_at,"
                " ue_host, spi_uc, spi_us, port_uc, port_us, alg, ealg, pcscf_host, keys_digest)"
                " VALUES (?, ?, 5100, 5200, 0, ?, ?, 1111, 2222, 31000, 31001,"
                " 'hmac-sha-1-96', 'aes-cbc', '10.0.0.1', x'00') RETURNING id",
                (900000 + 2 * i, 900001 + 2 * i, now, host)).fetchone()
            db.execute(
                "INSERT INTO contacts (aor, uri, contact_host, contact_port, via_host, via_port,"
                " via_proto, received_host, received_port, received_proto, state, expires,"
                f" {'tunnel_id' if registered else 'pending_tunnel_id'}) VALUES (?, ?, ?, 5060,"
                " ?, 5060, 'udp', ?, 5060, 'udp', ?, ?, ?)",
                (f"sip:u{i}@ims.example", f"sip:u{i}@{host}:5060", host, host, host,
                 "registered" if registered else "pending", now + (600 if registered else 30),
                 tid))


def _steps(p: Pcscf, call) -> int:
    """SQLite VM instructions `call()` runs on the module's store connection."""
    db = p.module.store._db()
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    db.set_progress_handler(count, 1)
    try:
        call()
    finally:
        db.set_progress_handler(None, 1)
    return steps[0]


@contextmanager
def _holding(tmp_path, name: str, held: int, registered: bool, **defines: str):
    """A P-CSCF whose store already holds `held` phones (`_held`)."""
    p = Pcscf.start(str(tmp_path / f"ipsec-{name}-{held}.sqlite"), IPSEC_SPI_ID_RANGE="20000",
                    **defines)
    try:
        _held(p, held, registered)
        yield p
    finally:
        p.module.store.close()


def _steps_of_a_challenge(tmp_path, held: int, registered: bool) -> int:
    with _holding(tmp_path, f"challenge-{registered}", held, registered,
                  PENDING_PER_HOST="100000") as p:
        host = "10.0.9.9"
        raw = register(aor="sip:new@ims.example", contact=f"sip:new@{host}:5060",
                       via=f"{host}:5060", security_client=OFFER.format(s=3001, t=3002))
        rec = p.request(raw, source=(host, 5060, "udp"))
        answered = []
        steps = _steps(p, lambda: answered.append(p.register_reply(
            rec.relays[0], reply_to(raw, 401, "Unauthorized",
                                    (f"WWW-Authenticate: {challenge()}",)))))
        assert answered[0].values("Security-Server"), answered[0].log_text()
        return steps


@pytest.mark.parametrize("registered", [False, True], ids=["unconfirmed", "registered"])
def test_a_challenge_costs_the_same_with_many_phones_held(tmp_path, registered):
    """Before: 983 instructions with 20 unconfirmed phones, 42,563 with 2,000 (every
    unconfirmed contact read at each challenge, through the wrong index)."""
    few = _steps_of_a_challenge(tmp_path, 20, registered)
    many = _steps_of_a_challenge(tmp_path, 2000, registered)
    assert many < 1.5 * few, (few, many)


def _steps_of_a_registration(tmp_path, held: int) -> int:
    with _holding(tmp_path, "registration", held, registered=True) as p:
        steps = _steps(p, p.registered)  # 401, protected REGISTER through the new SAs, 200 OK
        assert p.module.store.find_by_aor("sip:alice@ims.example")[0].state == "registered"
        return steps


def test_a_whole_registration_costs_the_same_with_many_phones_registered(tmp_path):
    few = _steps_of_a_registration(tmp_path, 20)
    many = _steps_of_a_registration(tmp_path, 2000)
    assert many < 1.5 * few, (few, many)


def _sweep_and_teardown_steps(tmp_path, held: int) -> tuple[int, int, int]:
    """What the sweep asks every second with nothing to do (the expired contacts, the stale
    pending tunnels), and what one de-registration's delete costs."""
    with _holding(tmp_path, "sweep", held, registered=True) as p:
        p.registered()
        store, now = p.module.store, time.time()
        expired = _steps(p, lambda: store.expired(now, 30))
        stale = _steps(p, lambda: store.drop_stale_pending(30, now))
        (alice,) = store.find_by_aor("sip:alice@ims.example")
        deleted = _steps(p, lambda: store.delete_contacts([alice.id]))
        return expired, stale, deleted


def test_the_sweep_and_a_teardown_cost_the_same_with_many_phones_registered(tmp_path):
    """Before: the sweep's expiry query walked the whole expires index and its stale-pending
    query every contact, each second; a de-registration's delete read every contact to learn
    whether another one used its tunnel (a join on `t.id IN (c.tunnel_id, ...)`). In VM
    instructions, 20 phones then 2,000: expired 203 -> 18,023, stale pending 81 -> 6,021,
    delete 275 -> 12,155; now 18, 22 and 169 for both."""
    few = _sweep_and_teardown_steps(tmp_path, 20)
    many = _sweep_and_teardown_steps(tmp_path, 2000)
    assert all(m < 1.5 * f + 20 for f, m in zip(few, many)), (few, many)


def test_ipsec_destroy_by_aor_or_contact_uri_reads_only_that_phones_contacts(tmp_path):
    """ipsec_destroy(domain, aor) looks contacts up by AoR or contact URI: `c.uri = ?` had no
    index, so each call read every contact: 175 VM instructions with 20 phones, 10,075 with
    2,000."""
    costs = []
    for held in (20, 2000):
        with _holding(tmp_path, "aor", held, registered=True) as p:
            p.registered()
            store = p.module.store
            (alice,) = store.find_by_aor("sip:alice@ims.example")
            assert [c.id for c in store.find_by_aor(alice.uri)] == [alice.id]
            assert [c.id for c in store.find_by_aor("sip:u7@ims.example")] != []
            assert store.find_by_aor("not a uri") == []
            costs.append((_steps(p, lambda: store.find_by_aor("sip:alice@ims.example")),
                          _steps(p, lambda: store.find_by_aor(alice.uri))))
    (few, many) = costs
    assert all(m < 1.5 * f + 20 for f, m in zip(few, many)), costs


def test_the_sweep_looks_for_leftover_leases_every_ten_seconds_not_every_second(pcscf):
    """That query reads every lease (leased_at has no index): once a second it was O(phones)
    each second; a lease a dead worker left waits at most 10 s more for it."""
    calls = []
    real = pcscf.module.store.stale_leases

    def counted(*args, **kw):
        calls.append(pcscf.clock())
        return real(*args, **kw)

    pcscf.module.store.stale_leases = counted
    for _ in range(3):
        assert pcscf.module.sweep() == 1
        pcscf.clock.advance(1)
    assert len(calls) == 1
    pcscf.clock.advance(module.UNUSED_CHECK_EVERY)
    assert pcscf.module.sweep() == 1 and len(calls) == 2


def test_a_challenge_reads_the_clock_once(pcscf, monkeypatch):
    """The lease and the binding of one challenge share one clock read: inside User-mode
    Linux, which has no vDSO, each read is a system call (~50 us, as dear as a netlink send).
    Counted: the store's clock and the wall clock of the process."""
    reads = []
    clock, wall = pcscf.module.store.clock, time.time

    def counted(read):
        def counting() -> float:
            reads.append(read)
            return read()
        return counting

    reg = register(security_client=OFFER.format(s=1111, t=2222))
    rec = pcscf.request(reg)
    monkeypatch.setattr(pcscf.module.store, "clock", counted(clock))
    monkeypatch.setattr(time, "time", counted(wall))
    pcscf.register_reply(rec.relays[0], reply_to(reg, 401, "Unauthorized", (
        f"WWW-Authenticate: {challenge()}",)))
    monkeypatch.undo()
    assert pcscf.kernel.sas, "no tunnel was installed: the test did not challenge"
    assert len(reads) == 1


def _pages_written(p: Pcscf, call) -> int:
    """WAL frames (pages) that `call()`'s commits append, the WAL emptied first."""
    db = p.module.store._db()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    call()
    return db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def test_a_new_phones_challenge_writes_thirteen_pages(pcscf):
    """Each page a commit dirties is two pwrite (frame header, page) and, in the next worker
    to read it, a pread: ~55 us each in User-mode Linux. The tunnel row and its 4 indexes,
    the contact row and its 5 indexes (its unset tunnel is in no index: partial),
    sqlite_sequence and meta: 13."""
    reg = register(security_client=OFFER.format(s=1111, t=2222))
    (relay,) = pcscf.request(reg).relays
    pages = _pages_written(pcscf, lambda: pcscf.register_reply(relay, reply_to(
        reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge()}",))))
    assert pcscf.kernel.sas, "no tunnel was installed: the test did not challenge"
    assert pages == 13
