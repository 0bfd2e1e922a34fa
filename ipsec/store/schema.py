"""The SQLite file: creation with mode 0600, WAL, the schema and its version.

Kept apart from the queries so a schema change is one diff in one place, with its version.
"""
from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Callable

from ipsec.store.records import SchemaMismatch, StoreError

VERSION = 8

# A `tunnels` row is a lease: an SPI pair (spi_pc, spi_ps = spi_pc + 1, unique each) and a
# port pair; its phone-side columns stay NULL until a tunnel is staged on it. A contact's
# `tunnel_id` is the SA set in use; `pending_tunnel_id` one offered in a 401 and not yet
# confirmed by the phone (33.203 7.4: the old SAs serve until the new ones have carried a
# REGISTER). A tunnel's `txn` names the REGISTER transaction whose 401 offered it (a second
# 401 to the same REGISTER must not build another); a contact's `transport` is how requests
# reach the phone (its Contact's transport parameter, else the protocol its last REGISTER
# came by); `associated` and `service_route` are the P-Associated-URI and Service-Route URIs of
# its last 200 OK (one per line: the identities a request through its SAs may assert, and the
# S-CSCF its in-dialog requests may go to). A `renewals` row asks the sweep to move the kernel
# lifetime of a registered contact's tunnel to its expiry (ipsec/renewals.py); `seq` counts the
# requests, so the sweep deletes only the one it served. Every index costs a page written per change in every Kamailio worker's commit:
# only those the look-ups need are here. The two tunnel indexes hold only the contacts that
# have one (partial): a new contact's challenge leaves contacts_tunnel alone, and the
# look-ups (`= ?`, the foreign keys' ON DELETE SET NULL) never ask for NULL; the one query
# for `tunnel_id IS NULL` (limits' unconfirmed contacts) must not use it anyway.
DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE tunnels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spi_pc INTEGER NOT NULL UNIQUE,
    spi_ps INTEGER NOT NULL UNIQUE,
    port_pc INTEGER NOT NULL,
    port_ps INTEGER NOT NULL,
    port_index INTEGER NOT NULL,
    leased_at REAL NOT NULL,
    ue_host TEXT, spi_uc INTEGER, spi_us INTEGER, port_uc INTEGER, port_us INTEGER,
    alg TEXT, ealg TEXT, pcscf_host TEXT, keys_digest BLOB, offer TEXT, security_server TEXT,
    txn BLOB
);
CREATE INDEX tunnels_ue_uc ON tunnels (ue_host, port_uc);
CREATE INDEX tunnels_ue_us ON tunnels (ue_host, port_us);
CREATE TABLE contacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    aor TEXT NOT NULL,
    uri TEXT NOT NULL,
    contact_host TEXT NOT NULL, contact_port INTEGER NOT NULL,
    via_host TEXT NOT NULL, via_port INTEGER NOT NULL, via_proto TEXT NOT NULL,
    received_host TEXT NOT NULL, received_port INTEGER NOT NULL, received_proto TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'registered')),
    expires REAL NOT NULL,
    tunnel_id INTEGER REFERENCES tunnels (id) ON DELETE SET NULL,
    pending_tunnel_id INTEGER REFERENCES tunnels (id) ON DELETE SET NULL,
    transport TEXT NOT NULL DEFAULT 'udp',
    associated TEXT NOT NULL DEFAULT '',
    service_route TEXT NOT NULL DEFAULT '',
    UNIQUE (aor, received_host, received_port, received_proto)
);
CREATE INDEX contacts_received ON contacts (received_host, received_port);
CREATE INDEX contacts_contact ON contacts (contact_host, contact_port);
CREATE INDEX contacts_expires ON contacts (expires);
CREATE INDEX contacts_tunnel ON contacts (tunnel_id) WHERE tunnel_id IS NOT NULL;
CREATE INDEX contacts_pending_tunnel ON contacts (pending_tunnel_id)
    WHERE pending_tunnel_id IS NOT NULL;
CREATE TABLE renewals (
    contact_id INTEGER PRIMARY KEY REFERENCES contacts (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL
);
"""

# `tunnel_count` in meta is the number of rows of `tunnels`, kept by SQLite itself in the
# transaction that inserts or deletes them: the flood limits weigh the free SPI pairs at every
# challenge and the sweep publishes them every second, and count(*) reads every page of an
# index (324 pages at 100,000 leases, measured with dbstat; each a pread after another
# worker's commit).
COUNTED = (
    "CREATE TRIGGER tunnels_counted_in AFTER INSERT ON tunnels BEGIN"
    " UPDATE meta SET value = value + 1 WHERE key = 'tunnel_count'; END",
    "CREATE TRIGGER tunnels_counted_out AFTER DELETE ON tunnels BEGIN"
    " UPDATE meta SET value = value - 1 WHERE key = 'tunnel_count'; END",
)

# Each step takes a file of version N to N + 1 inside the start-up transaction, so a P-CSCF
# upgraded in place keeps its phones registered.
MIGRATIONS = {
    2: ("ALTER TABLE tunnels ADD COLUMN txn BLOB",
        "ALTER TABLE contacts ADD COLUMN transport TEXT NOT NULL DEFAULT 'udp'",
        "UPDATE contacts SET transport = received_proto"),
    # v3's spis table (the tunnels' two UNIQUE SPI columns say the same) and lease_host (the
    # phone address is staged with the lease) cost pages on every lease
    3: ("DROP TABLE spis",
        "DROP INDEX tunnels_lease_host",
        "ALTER TABLE tunnels DROP COLUMN lease_host"),
    # a registration's identities and S-CSCF (24.229 5.2.6.3); rows of v4 have none: a
    # registered contact then asserts its AoR until its next 200 OK
    4: ("ALTER TABLE contacts ADD COLUMN associated TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE contacts ADD COLUMN service_route TEXT NOT NULL DEFAULT ''"),
    5: ("INSERT INTO meta (key, value) SELECT 'tunnel_count', count(*) FROM tunnels",
        *COUNTED),
    # kernel lifetimes renewed by the sweep in batches, not by the worker at each 200 OK
    6: ("CREATE TABLE renewals (contact_id INTEGER PRIMARY KEY"
        " REFERENCES contacts (id) ON DELETE CASCADE, seq INTEGER NOT NULL)",),
    # partial tunnel indexes: a new contact's challenge writes one index page fewer (each
    # page is two pwrite and, after another worker's commit, a pread)
    7: ("DROP INDEX contacts_tunnel",
        "DROP INDEX contacts_pending_tunnel",
        "CREATE INDEX contacts_tunnel ON contacts (tunnel_id) WHERE tunnel_id IS NOT NULL",
        "CREATE INDEX contacts_pending_tunnel ON contacts (pending_tunnel_id)"
        " WHERE pending_tunnel_id IS NOT NULL"),
}


WAL_AUTOCHECKPOINT_PAGES = 20000
WAL_RESTART_FRAMES = 2048  # 8 MB of 4 KB pages: the sweep rewinds the WAL past this (Store.checkpoint)
WAL_RESTART_WAIT_MS = 100  # how long that rewind waits for readers of older snapshots


def create_file(path: str) -> None:
    """Create the file 0600 before SQLite does: it holds who is registered where.

    SQLite gives its -wal and -shm files the database file's mode, so they follow.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)


def connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    """One process's connection: autocommit (we BEGIN ourselves), WAL, waits instead of failing."""
    create_file(path)
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    mode = _retry_locked(lambda: db.execute("PRAGMA journal_mode=WAL").fetchone()[0],
                         busy_timeout)
    if mode != "wal":
        db.close()
        raise StoreError(f"store {path}: cannot use WAL (journal mode stays {mode!r})")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    # The expiry sweep checkpoints the WAL every second (Store.checkpoint), off the SIP path;
    # a worker's commit runs one itself only if the WAL grows past this many pages anyway
    # (SQLite's default, 1,000, made every thousandth page's worker copy 4 MB mid-request).
    db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    return db


def ensure_schema(db: sqlite3.Connection, spi_start: int) -> None:
    """Create the schema on first use, in one transaction, so racing workers create it once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
            for statement in DDL.split(";"):
                if statement.strip():
                    db.execute(statement)
            for statement in COUNTED:
                db.execute(statement)
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                ("schema_version", VERSION),
                ("secret", secrets.token_bytes(32)),
                ("next_spi", spi_start),
                ("next_port", 0),
                ("tunnel_count", 0),
            ])
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        while version is not None and version[0] in MIGRATIONS:
            for statement in MIGRATIONS[version[0]]:
                db.execute(statement)
            version = (version[0] + 1,)
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", version)
        if version is None or version[0] != VERSION:
            raise SchemaMismatch(f"store schema version {version and version[0]}, "
                                 f"this code knows {VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _retry_locked(call: Callable[[], str], timeout: float) -> str:
    """Switching to WAL takes a lock the busy handler does not always wait for: retry it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
