"""ipsec.store across OS processes: concurrent leasing and processes killed mid-change.

Kamailio's workers are forked processes; these tests fork real ones on one store file.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import sys
import time
import traceback

import pytest

from ipsec.sipuri import Address
from ipsec.store import Lease, Store, Tunnel, UeSide

SPI_START, SPI_RANGE = 1000, 40
PROCESSES, CYCLES = 8, 2000


def make(path) -> Store:
    return Store(str(path), spi_start=SPI_START, spi_range=SPI_RANGE, client_port=5100,
                 server_port=5200, max_connections=4, busy_timeout=5.0)


def fork(body) -> int:
    """Run `body()` in a forked child; returns its pid. A failure exits 1 with a traceback."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """Exit code, or minus the signal that killed it."""
    status = os.waitpid(pid, 0)[1]
    return os.waitstatus_to_exitcode(status)


def tunnel_on(store: Store, lease: Lease, n: int = 1) -> Tunnel:
    return Tunnel(lease, UeSide(f"10.0.0.{n}", 100 + n, 200 + n, 6100, 6200), "hmac-md5-96",
                  "null", "192.0.2.1", store.keys_digest(b"c" * 16, b"i" * 16), "offer", "server")


def snapshot(path) -> dict[str, list]:
    db = sqlite3.connect(path)
    try:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("meta", "tunnels", "contacts")}
    finally:
        db.close()


def assert_consistent(path) -> None:
    """What must hold after any crash: an intact file whose rows agree with each other."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        held: list[int] = []
        for spi_pc, spi_ps, port_pc, port_ps in db.execute(
                "SELECT spi_pc, spi_ps, port_pc, port_ps FROM tunnels"):
            assert spi_ps == spi_pc + 1 and SPI_START <= spi_pc < SPI_START + SPI_RANGE
            assert port_pc - 5100 == port_ps - 5200 and 0 <= port_pc - 5100 < 4
            held += [spi_pc, spi_ps]
        assert len(held) == len(set(held)), "an SPI leased twice"
        assert db.execute("SELECT count(*) FROM contacts WHERE tunnel_id IS NOT NULL AND "
                          "tunnel_id NOT IN (SELECT id FROM tunnels)").fetchone() == (0,)
    finally:
        db.close()


def assert_usable(path) -> None:
    """No lock survives its dead holder: a new process leases and releases at once."""
    store = make(path)
    store.busy_timeout = 1.0
    store.release(store.lease())
    store.close()


# -- 8 processes x 2,000 cycles ------------------------------------------------------------

def test_eight_processes_never_hold_the_same_spi_at_once(tmp_path):
    path = tmp_path / "ipsec.db"
    first = make(path)  # create the file and schema before the race, as mod_init would
    first.release(first.lease())
    # and closed before the fork, as mod_init does: a connection left to the cyclic GC (the
    # sqlite3 module's statement cache holds it in a cycle) may be collected in a child,
    # whose close then checkpoints and may delete the WAL the other processes still use
    # (seen: 4 released leases back in the file, when the tests before this one left the
    # collector at another threshold)
    first.close()
    holders = multiprocessing.Array("i", SPI_RANGE)  # shared memory: the independent witness
    clashes = multiprocessing.Value("i", 0)

    def take(lease: Lease, delta: int) -> None:
        with holders.get_lock():
            for spi in (lease.spi_pc, lease.spi_ps):
                holders[spi - SPI_START] += delta
                if holders[spi - SPI_START] > 1:
                    clashes.value += 1

    def worker(n: int) -> None:
        store = make(path)
        held: list[tuple[Lease, int]] = []
        log = []
        for _ in range(CYCLES):  # each process holds up to 2 leases: 16 of 20 pairs in use
            lease = store.lease(f"10.0.{n}.1")
            take(lease, +1)
            held.append((lease, time.monotonic_ns()))
            if len(held) == 2:
                old, since = held.pop(0)
                log.append((old.spi_pc, since, time.monotonic_ns()))
                take(old, -1)
                store.release(old)
        for old, since in held:
            log.append((old.spi_pc, since, time.monotonic_ns()))
            take(old, -1)
            store.release(old)
        (tmp_path / f"log{n}").write_text("".join(f"{s} {a} {b}\n" for s, a, b in log))

    pids = [fork(lambda n=n: worker(n)) for n in range(PROCESSES)]
    assert [wait(pid) for pid in pids] == [0] * PROCESSES
    assert clashes.value == 0
    intervals: dict[int, list[tuple[int, int]]] = {}
    for n in range(PROCESSES):
        for line in (tmp_path / f"log{n}").read_text().splitlines():
            spi, start, end = map(int, line.split())
            intervals.setdefault(spi, []).append((start, end))
    assert sum(map(len, intervals.values())) == PROCESSES * CYCLES
    assert set(intervals) == set(range(SPI_START, SPI_START + SPI_RANGE, 2))
    for spi, spans in intervals.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, f"SPI {spi} held twice at once"
    assert snapshot(path)["tunnels"] == []
    assert_consistent(path)


def test_eight_processes_opening_a_new_file_at_once_all_succeed(tmp_path):
    """The schema is created once, and the switch to WAL waits for the others."""
    for round_ in range(8):
        path = tmp_path / f"new{round_}.db"
        pids = [fork(lambda: make(path).lease()) for _ in range(PROCESSES)]
        assert [wait(pid) for pid in pids] == [0] * PROCESSES
        assert len(snapshot(path)["tunnels"]) == PROCESSES


# -- a process killed in the middle of a change --------------------------------------------

def setup_scenario(path) -> dict:
    """A registered phone with a tunnel, a spare lease to swap in, and a pending phone."""
    store = make(path)
    alice = store.save_pending("sip:alice@ims", "sip:alice@10.0.0.1:6200",
                               Address("10.0.0.1", 5060), Address("10.0.0.1", 5060))
    store.set_tunnel(alice.id, tunnel_on(store, store.lease("10.0.0.1")))
    store.set_registered(alice.id, time.time() + 600)
    spare = store.lease("10.0.0.1")
    bob = store.save_pending("sip:bob@ims", "sip:bob@10.0.0.2:6200",
                             Address("10.0.0.2", 5060), Address("10.0.0.2", 5060))
    store.close()
    return {"alice": alice.id, "bob": bob.id, "spare": spare}


OPERATIONS = {
    "lease": lambda s, ids: s.lease("10.0.0.1"),
    "release": lambda s, ids: s.release(ids["spare"]),
    "save_pending (new)": lambda s, ids: s.save_pending(
        "sip:carol@ims", "sip:carol@10.0.0.3", Address("10.0.0.3", 5060),
        Address("10.0.0.3", 5060)),
    "save_pending (refresh)": lambda s, ids: s.save_pending(
        "sip:bob@ims", "sip:bob@10.0.0.2:6300", Address("10.0.0.2", 5060),
        Address("10.0.0.2", 5060)),
    "set_registered": lambda s, ids: s.set_registered(ids["bob"], 1e10),
    "set_tunnel (swap)": lambda s, ids: s.set_tunnel(ids["alice"],
                                                    tunnel_on(s, ids["spare"], 2)),
    "delete_contacts": lambda s, ids: s.delete_contacts([ids["alice"]]),
    "release attached": lambda s, ids: s.release(SPI_START),
}


@pytest.mark.parametrize("name", OPERATIONS)
def test_a_process_killed_at_any_statement_changes_nothing(tmp_path, name):
    """Kill the child just before each statement of one operation in turn (COMMIT included):
    the file must stay exactly as before, until the run where the operation completes."""
    path = tmp_path / "ipsec.db"
    ids = setup_scenario(path)
    before = snapshot(path)
    for kill_at in range(1, 50):
        def body() -> None:
            store = make(path)
            seen = iter(range(1, kill_at + 1))
            store._db().set_trace_callback(
                lambda sql: next(seen, None) == kill_at and os.kill(os.getpid(), signal.SIGKILL))
            OPERATIONS[name](store, ids)
        code = wait(fork(body))
        assert_consistent(path)
        if code == 0:
            break
        assert code == -signal.SIGKILL
        assert snapshot(path) == before, f"killed before statement {kill_at}"
    else:
        pytest.fail("the operation never completed")
    assert kill_at > 3, "the operation ran fewer statements than BEGIN + a change + COMMIT"
    assert snapshot(path) != before
    assert_usable(path)


def test_processes_killed_at_random_moments_leave_a_consistent_store(tmp_path):
    path = tmp_path / "ipsec.db"
    setup_scenario(path)
    rng = random.Random(4)

    def churn(k: int) -> None:
        store = make(path)
        for n in range(10**9):
            host = f"10.{k + 1}.{n % 200}.1"
            lease = store.lease(host)
            contact = store.save_pending(f"sip:u{n}.{k}@ims", f"sip:u@{host}",
                                         Address(host, 5060), Address(host, 5060))
            store.set_tunnel(contact.id, tunnel_on(store, lease, n % 200))
            store.release_all(t.lease for t in store.delete_contacts([contact.id]))

    def leased_so_far() -> int:
        db = sqlite3.connect(path)
        try:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tunnels'").fetchone()
        finally:
            db.close()
        return row[0] if row else 0

    for _ in range(6):
        start = leased_so_far()
        pids = [fork(lambda k=k: churn(k)) for k in range(2)]
        # kill mid-churn however slow the machine is: after real progress, at a random moment
        deadline = time.monotonic() + 60
        while leased_so_far() < start + 20 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert [wait(pid) for pid in pids] == [-signal.SIGKILL] * 2
        assert_consistent(path)
        assert_usable(path)
    db = sqlite3.connect(path)
    leased = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tunnels'").fetchone()[0]
    db.close()
    assert leased > 100, "the churn did too little to be interrupted"
