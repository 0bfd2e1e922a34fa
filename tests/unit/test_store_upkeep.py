"""What keeps the store's footprint level over hours of traffic (issue 11 item 4, `make soak`):
SQLite's prepared statements and the write-ahead log."""
from __future__ import annotations

import ctypes
import ctypes.util
import sqlite3
import threading
import time

import pytest

from ipsec.store import Tunnel, schema
from ipsec.store.store import _in_list
from test_store import make


def sqlite_memory_used() -> int:
    """SQLite's own count of the bytes it has allocated in this process (all connections)."""
    lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib.sqlite3_memory_used()


def test_in_lists_are_padded_to_powers_of_two():
    assert _in_list([7]) == ("?", (7,))
    assert _in_list([1, 2, 3]) == ("?,?,?,?", (1, 2, 3, 3))
    assert _in_list(range(5))[0].count("?") == 8
    assert _in_list([]) == ("NULL", ())


def test_batches_of_every_size_keep_sqlite_memory_bounded(tmp_path):
    """The sweep's batches (leases given back, de-registration notes taken) vary in size with
    the traffic. One SQL text per size made SQLite keep one prepared statement per size (128
    in Python's cache, each the bigger the longer its list): ~8 MB for sizes 1 to 300."""
    store = make(tmp_path / "ipsec.db", spi_range=4000)
    store.release_all([])
    store.take_deregistered([1])
    before = sqlite_memory_used()
    for n in range(1, 301):
        store.release_all(range(900_000, 900_000 + n))  # nothing leased there: text only
        store.take_deregistered(range(n))
    grown = sqlite_memory_used() - before
    store.close()
    assert grown < 2_000_000, f"SQLite memory grew by {grown} bytes"


def wal_frames(store) -> int:
    return store._query("PRAGMA wal_checkpoint(PASSIVE)")[0][1]


def churn(store, n: int) -> None:
    for _ in range(n):
        store.release(store.lease())


def test_the_sweep_rewinds_a_wal_that_readers_keep_from_rewinding(tmp_path, monkeypatch):
    """A reader holding an older snapshot while the sweep checkpoints (thirty Kamailio
    processes read all the time) keeps a passive checkpoint from finishing, so no writer
    ever starts the log again from the top and it grows for as long as traffic lasts. Past
    WAL_RESTART_FRAMES the sweep waits a moment for such readers (RESTART)."""
    monkeypatch.setattr(schema, "WAL_RESTART_FRAMES", 20)
    store = make(tmp_path / "ipsec.db", spi_range=4000)
    store.checkpoint()
    reader = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    try:
        churn(store, 15)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM tunnels").fetchall()  # a snapshot, held
        churn(store, 15)
        threading.Timer(0.03, reader.execute, ("COMMIT",)).start()  # its read is done soon
        store.checkpoint()
        churn(store, 1)
        assert wal_frames(store) <= 20  # the log started again from its first frame
    finally:
        reader.close()
        store.close()


def test_a_reader_that_holds_on_delays_the_rewind_but_not_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "WAL_RESTART_FRAMES", 20)
    store = make(tmp_path / "ipsec.db", spi_range=4000)
    reader = sqlite3.connect(store.path, isolation_level=None)
    try:
        churn(store, 15)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM tunnels").fetchall()
        churn(store, 15)
        t0 = time.monotonic()
        store.checkpoint()  # gives up after WAL_RESTART_WAIT_MS, no error
        assert time.monotonic() - t0 < 1.0
        assert store._query("PRAGMA busy_timeout")[0][0] == int(store.busy_timeout * 1000)
        churn(store, 1)  # writers are not held up
        reader.execute("COMMIT")
        store.checkpoint()
        churn(store, 1)
        assert wal_frames(store) <= 20
    finally:
        reader.close()
        store.close()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 600])
def test_padded_lists_release_exactly_what_they_name(tmp_path, n):
    store = make(tmp_path / "ipsec.db", spi_range=4000)
    leases = [store.lease() for _ in range(n)]
    keep = store.lease()
    assert store.release_all(leases) == n
    assert store.release_all([keep]) == 1
    store.close()


def counted(store) -> tuple[int, int]:
    db = store._db()
    return (db.execute("SELECT value FROM meta WHERE key = 'tunnel_count'").fetchone()[0],
            db.execute("SELECT count(*) FROM tunnels").fetchone()[0])


def test_the_tunnel_count_follows_every_way_a_tunnel_row_comes_and_goes(tmp_path):
    """The flood limits read the number of leases at every challenge, the sweep every
    second: kept by triggers (schema.COUNTED) instead of a count(*) over the table."""
    import random
    import time as clock
    from test_store import pending, tunnel_on
    store = make(tmp_path / "ipsec.db", spi_range=400, max_connections=4)
    rng = random.Random(7)
    contacts: list[int] = []
    for step in range(400):
        what = rng.randrange(6)
        if what == 0:
            store.lease()
        elif what == 1 and contacts:
            store.delete_contacts([contacts.pop(rng.randrange(len(contacts)))])
        elif what == 2:
            host = f"10.0.{step // 200}.{step % 200 + 1}"
            c = pending(store, aor=f"sip:u{step}@ims.example", host=host)
            store.set_tunnel(c.id, tunnel_on(store, store.lease(host), host))
            contacts.append(c.id)
        elif what == 3:
            leases = [t.lease if isinstance(t, Tunnel) else t for t, _ in store.leases_with_age()]
            store.release_all(rng.sample(leases, min(len(leases), rng.randrange(4))))
        elif what == 4:
            store.release_all(t for t, _ in store.leases_with_age() if not isinstance(t, Tunnel))
            if not contacts:
                store.reset_leases_if_empty()  # DELETE FROM tunnels, no WHERE: row by row
        else:
            store.drop_stale_pending(older_than=0.0, now=clock.time() + 3600)
            contacts = [c for c in contacts if store.get_contact(c) is not None]
        assert counted(store)[0] == counted(store)[1], f"step {step}"
    assert store.usage()[0] == counted(store)[1]
    store.close()
