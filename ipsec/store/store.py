"""The shared state of all Kamailio workers: SPI/port leases, contacts and their tunnels.

Kamailio forks workers that share no Python memory, yet two of them must never hand out the
same SPI, and a request in one worker must find the tunnel another worker built. So the state
lives in one SQLite file (WAL): each process opens its own connection lazily, after the fork,
and every change that touches more than one row is one `BEGIN IMMEDIATE` transaction, which
serialises writers across processes and leaves nothing half-done if a process dies.
"""
from __future__ import annotations

import hashlib
import hmac
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from ipsec.sipuri import (TRANSPORTS, Address, SipUri, SipUriError, alias_target, normalize_host,
                          parse_uri, uri_target)
from ipsec import forks
from ipsec.limits import Pressure, Verdict
from ipsec.store import schema
from ipsec.store.locks import WriterLock
from ipsec.store.records import (KEEP, NEW, PENDING, REFUSE, REGISTERED, Binding, Contact, Decision,
                                 Lease, NotLeased, PhoneSpiInUse, SpiExhausted, StoreError,
                                 Tunnel, UeSide, UnknownContact)

# Connections inherited across a fork are kept referenced, never closed or used: closing one
# in the child could disturb the parent's locks and WAL (SQLite forbids using it there).
_inherited: list[sqlite3.Connection] = []

_SCAN_WINDOW = 512  # SPIs examined per query when looking for a free pair

_CONTACT_COLUMNS = """
    c.id, c.aor, c.uri, c.via_host, c.via_port, c.via_proto,
    c.received_host, c.received_port, c.received_proto, c.state, c.expires, c.transport,
    c.associated, c.service_route"""
_TUNNEL_COLUMNS = """
    t.spi_pc, t.spi_ps, t.port_pc, t.port_ps, t.ue_host, t.spi_uc, t.spi_us, t.port_uc,
    t.port_us, t.alg, t.ealg, t.pcscf_host, t.keys_digest, t.offer, t.security_server, t.txn"""
_NC = _CONTACT_COLUMNS.count(",") + 1  # contact columns in a _CONTACT_SELECT row
_NT = _TUNNEL_COLUMNS.count(",") + 1  # then the tunnel in use, then the pending one
_CONTACT_SELECT = f"""
    SELECT {_CONTACT_COLUMNS}, {_TUNNEL_COLUMNS}, {_TUNNEL_COLUMNS.replace("t.", "p.")}
    FROM contacts c LEFT JOIN tunnels t ON t.id = c.tunnel_id
    LEFT JOIN tunnels p ON p.id = c.pending_tunnel_id"""
# a tunnels row (alias t) that some contact uses or has staged
_USED = ("EXISTS (SELECT 1 FROM contacts c WHERE c.tunnel_id = t.id"
         " OR c.pending_tunnel_id = t.id)")
# a contact (alias c) whose phone has never come back through any SAs (ipsec/limits.py)
# The unary + keeps SQLite from answering `tunnel_id IS NULL` with the contacts_tunnel index:
# without statistics it takes that for selective, and it matches every unconfirmed contact,
# so each challenge read them all (O(unconfirmed) per 401, the unit of a REGISTER flood);
# the queries below are driven by the pending tunnel, the phone's address or the AoR.
_UNCONFIRMED = "c.state = 'pending' AND +c.tunnel_id IS NULL"
_OLDEST_SHOWN = 4  # unconfirmed contacts a challenge is shown when the pool runs short


class Store:
    """One process's door to the shared state file; create it anywhere, use it after fork.

    SPIs are leased in pairs (spi_pc, spi_ps = spi_pc + 1) from [spi_start, spi_start +
    spi_range), so a range of N SPIs serves N // 2 phones. Ports come in pairs of one index
    (client_port + i, server_port + i), i in [0, max_connections), shared by many phones.
    """

    def __init__(self, path: str, *, spi_start: int, spi_range: int, client_port: int,
                 server_port: int, max_connections: int, pending_lifetime: float = 240.0,
                 busy_timeout: float = 30.0) -> None:
        if spi_start < 1 or spi_range < 2 or spi_start + spi_range - 1 > 0xFFFFFFFF:
            raise StoreError(f"SPI range [{spi_start}, {spi_start + spi_range}) is not usable")
        if max_connections < 1 or max(client_port, server_port) + max_connections > 65536:
            raise StoreError("protected port ranges do not fit in 1..65535")
        self.path = path
        self.spi_start = spi_start
        self.spi_last_pair = spi_start + (spi_range // 2 - 1) * 2
        self.spi_pairs = spi_range // 2
        self.client_port = client_port
        self.server_port = server_port
        self.max_connections = max_connections
        self.pending_lifetime = pending_lifetime
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._gen = -1
        self._secret = b""
        self._writer = WriterLock(path + ".lock")
        self.clock: Callable[[], float] = time.time  # a lease's time (the module's clock)

    # -- connection -------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """This process's connection, opened on first use and again in a forked child."""
        if self._conn is not None and self._gen == forks.generation():
            return self._conn
        self._drop_inherited()
        conn = schema.connect(self.path, self.busy_timeout)
        try:
            schema.ensure_schema(conn, self.spi_start)
            self._secret = conn.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        self._conn, self._gen = conn, forks.generation()
        return conn

    def changes(self) -> int:
        """Rows this process's connection has changed so far (SQLite's total_changes: no I/O),
        so that a memo of a look-up knows whether this process wrote since; -1 before it has a
        connection of its own."""
        if self._conn is None or self._gen != forks.generation():
            return -1
        return self._conn.total_changes

    def _drop_inherited(self) -> None:
        if self._conn is not None and self._gen != forks.generation():
            _inherited.append(self._conn)
        self._conn = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so two workers
        never both read the same free SPI and then race to write it.

        Writers first queue on the writer lock (a kernel lock: a waiter wakes the moment the
        holder is done), so SQLite's busy handler, which sleeps 1, 2, 5, 10... ms between
        tries, is left only for writers from outside (an operator's tool)."""
        with _sqlite_errors(self.path):
            db = self._db()
            with self._writer.held():
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                finally:
                    if db.in_transaction:
                        db.execute("ROLLBACK")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Several reads in one snapshot and one read lock (each statement outside a
        transaction is a transaction of its own, with its own locking system calls)."""
        with _sqlite_errors(self.path):
            db = self._db()
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with _sqlite_errors(self.path):
            return self._db().execute(sql, args).fetchall()

    def checkpoint(self) -> None:
        """Copy what the WAL holds into the database file without waiting for anyone
        (PASSIVE): called from the expiry sweep's timer, so no SIP worker pays for it.

        A passive checkpoint never rewinds the WAL: the next writer starts it again from
        its beginning only if no reader still holds an older snapshot, and with thirty
        processes reading all the time one always does (measured: the WAL reached 36 MB in
        160 s of `make soak`, and grows as long as traffic lasts). So once the WAL holds
        WAL_RESTART_FRAMES, the sweep takes the writer lock (workers' writes queue for a
        moment) and checkpoints in RESTART mode, waiting at most WAL_RESTART_WAIT_MS for
        readers of older snapshots: the next writer then starts the log from the top. A
        reader that holds on longer only makes it try again next second."""
        with _sqlite_errors(self.path):
            db = self._db()
            _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames < schema.WAL_RESTART_FRAMES:
                return
            with self._writer.held():
                db.execute(f"PRAGMA busy_timeout = {schema.WAL_RESTART_WAIT_MS}")
                try:
                    db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                finally:
                    db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

    def close(self) -> None:
        """Close this process's connection (a later call reopens it). Calling it in the main
        process before Kamailio forks keeps the children from inheriting an open one."""
        if self._conn is not None and self._gen == forks.generation():
            self._conn.close()
            self._conn = None
        self._drop_inherited()
        self._writer.close()

    def keys_digest(self, ck: bytes, ik: bytes) -> bytes:
        """Keyed digest of CK||IK: lets re-registration compare keys without storing them."""
        with _sqlite_errors(self.path):
            self._db()
        return hmac.new(self._secret, ck + ik, hashlib.sha256).digest()

    # -- leases -----------------------------------------------------------------------------

    def lease(self, ue_host: str | None = None, avoid: Iterable[int] = ()) -> Lease:
        """Lease a free SPI pair and the next port pair, for a phone at `ue_host` if known.

        The search starts after the last pair handed out, so a just-released SPI is the last
        to come back. SPIs in `avoid` are skipped: when the kernel refuses a lease's SA as a
        duplicate, release the lease and lease again avoiding those SPIs. With a `ue_host`,
        port pairs its existing tunnels use are skipped while another is free, so its old and
        new SAs never share selectors.
        """
        with self._tx() as db:
            return self._lease(db, ue_host, avoid)

    def _lease(self, db: sqlite3.Connection, ue_host: str | None, avoid: Iterable[int]) -> Lease:
        lease, index = self._choose_lease(db, ue_host, avoid, ())
        db.execute(
            "INSERT INTO tunnels (spi_pc, spi_ps, port_pc, port_ps, port_index, leased_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (lease.spi_pc, lease.spi_ps, lease.port_pc, lease.port_ps, index, self.clock()))
        return lease

    def _choose_lease(self, db: sqlite3.Connection, ue_host: str | None, avoid: Iterable[int],
                      ue_ports: tuple[int, ...]) -> tuple[Lease, int]:
        """The next free SPI pair and port pair (its index), the cursors moved past them."""
        host = normalize_host(ue_host) if ue_host else None
        cursors = dict(db.execute(
            "SELECT key, value FROM meta WHERE key IN ('next_spi', 'next_port')").fetchall())
        spi_pc = self._free_pair(db, cursors["next_spi"], frozenset(avoid))
        index = self._port_index(db, host, cursors["next_port"], ue_ports)
        db.execute("UPDATE meta SET value = CASE key WHEN 'next_spi' THEN ? ELSE ? END"
                   " WHERE key IN ('next_spi', 'next_port')",
                   (self._next_pair(spi_pc), (index + 1) % self.max_connections))
        return Lease(spi_pc, spi_pc + 1, self.client_port + index,
                     self.server_port + index), index

    def _lease_tunnel(self, db: sqlite3.Connection, ue: UeSide, avoid: Iterable[int],
                      build: Callable[[Lease], Tunnel], now: float) -> tuple[Tunnel, int]:
        """A lease (taken at `now`) and the tunnel `build` makes of it, written as one row;
        returns its id."""
        lease, index = self._choose_lease(db, ue.host, avoid, (ue.port_uc, ue.port_us))
        t = build(lease)
        self._refuse_phone_spis_in_use(db, t)
        tunnel_id = db.execute(
            "INSERT INTO tunnels (spi_pc, spi_ps, port_pc, port_ps, port_index, leased_at,"
            " ue_host, spi_uc, spi_us, port_uc, port_us, alg, ealg, pcscf_host, keys_digest,"
            " offer, security_server, txn) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, ?, ?)",
            (lease.spi_pc, lease.spi_ps, lease.port_pc, lease.port_ps, index, now,
             ue.host, ue.spi_uc, ue.spi_us, ue.port_uc, ue.port_us, t.alg, t.ealg,
             t.pcscf_host, t.keys_digest, t.offer, t.security_server, t.txn)).lastrowid
        return t, tunnel_id

    @staticmethod
    def _refuse_phone_spis_in_use(db: sqlite3.Connection, tunnel: Tunnel) -> None:
        """The kernel can hold one SA per (phone address, SPI): another tunnel with one of
        these phone SPIs must go first."""
        ue = tunnel.ue
        clash = db.execute(
            "SELECT spi_pc FROM tunnels WHERE ue_host = ? AND spi_pc != ?"
            " AND (spi_uc IN (?, ?) OR spi_us IN (?, ?))",
            (ue.host, tunnel.lease.spi_pc, ue.spi_uc, ue.spi_us, ue.spi_uc, ue.spi_us)).fetchone()
        if clash is not None:
            raise PhoneSpiInUse(f"{ue.host} SPIs {ue.spi_uc}/{ue.spi_us} are those of the "
                                f"tunnel on spi-c={clash[0]}")

    def _free_pair(self, db: sqlite3.Connection, cursor: int, avoid: frozenset[int]) -> int:
        """First free pair from the cursor on, wrapping once around the range. The pair at
        the cursor is nearly always free (leases rotate through the range): one look-up."""
        if not self.spi_start <= cursor <= self.spi_last_pair:
            cursor = self.spi_start
        cursor -= (cursor - self.spi_start) % 2
        if not avoid & {cursor, cursor + 1} and db.execute(
                "SELECT 1 FROM tunnels WHERE spi_pc IN (?, ?) OR spi_ps IN (?, ?)",
                (cursor, cursor + 1) * 2).fetchone() is None:
            return cursor
        for low, high in ((cursor, self.spi_last_pair), (self.spi_start, cursor - 2)):
            for first in range(low, high + 1, _SCAN_WINDOW):
                last = min(first + _SCAN_WINDOW - 2, high)
                # both columns: a lease taken under another ipsec_spi_id_start may straddle
                used = {row[0] for row in db.execute(
                    "SELECT spi_pc FROM tunnels WHERE spi_pc BETWEEN ?1 AND ?2 UNION ALL"
                    " SELECT spi_ps FROM tunnels WHERE spi_ps BETWEEN ?1 AND ?2",
                    (first, last + 1))}
                for spi in range(first, last + 1, 2):
                    if not used & {spi, spi + 1} and not avoid & {spi, spi + 1}:
                        return spi
        raise SpiExhausted(f"all {(self.spi_last_pair - self.spi_start) // 2 + 1} SPI pairs "
                           f"from {self.spi_start} are leased or avoided")

    def _next_pair(self, spi_pc: int) -> int:
        return spi_pc + 2 if spi_pc < self.spi_last_pair else self.spi_start

    def _port_index(self, db: sqlite3.Connection, host: str | None, cursor: int,
                    ue_ports: tuple[int, ...]) -> int:
        """The next port pair in rotation, skipping those of the phone's other tunnels: with
        `ue_ports` (the phone's ports of the new tunnel) only the tunnels that share one of
        them, whose selectors would be the same (phones behind one NAT address are many)."""
        start = cursor % self.max_connections
        busy: set[int] = set()
        if host is not None and self.max_connections > 1:
            if ue_ports:
                marks, ports = _in_list(ue_ports)
                busy = {row[0] for row in db.execute(
                    f"SELECT port_index FROM tunnels WHERE ue_host = ? AND port_uc IN ({marks})"
                    f" UNION SELECT port_index FROM tunnels WHERE ue_host = ?"
                    f" AND port_us IN ({marks})", (host, *ports) * 2)}
            else:
                busy = {row[0] for row in db.execute(
                    "SELECT port_index FROM tunnels WHERE ue_host = ?", (host,))}
        for step in range(self.max_connections):
            index = (start + step) % self.max_connections
            if index not in busy:
                return index
        return start

    def release(self, lease: Lease | int) -> bool:
        """Give back a lease (or the lease holding this SPI); False if it was not leased.

        Contacts still pointing at its tunnel lose it in the same transaction.
        """
        return self.release_all([lease]) == 1

    def release_all(self, leases: Iterable[Lease | int]) -> int:
        """Give back many leases in one transaction; returns how many were leased."""
        spis = [lease.spi_pc if isinstance(lease, Lease) else lease for lease in leases]
        released = 0
        with self._tx() as db:
            for i in range(0, len(spis), 512):
                marks, chunk = _in_list(spis[i:i + 512])
                released += db.execute(
                    f"DELETE FROM tunnels WHERE spi_pc IN ({marks}) OR spi_ps IN ({marks})",
                    chunk * 2).rowcount
        return released

    def live_tunnels(self) -> list[Tunnel]:
        """Tunnels some contact uses: what the kernel should hold after a restart."""
        rows = self._query(
            f"SELECT {_TUNNEL_COLUMNS} FROM tunnels t WHERE t.ue_host IS NOT NULL AND {_USED}"
            " ORDER BY t.id")
        return [_tunnel(row) for row in rows]

    def stale_leases(self, older_than: float, now: float | None = None) -> list[Tunnel | Lease]:
        """Leases no contact uses, taken more than `older_than` seconds ago.

        They are left by a worker that died between leasing and attaching, or between
        replacing a tunnel and releasing the old one. A Tunnel carries what removing its SAs
        needs (do that before `release`); a bare Lease was never attached, so SAs a dead
        worker may have half-installed for it are known only by our SPIs, or to the startup
        reconciliation by marker.
        """
        cutoff = (time.time() if now is None else now) - older_than
        rows = self._query(
            f"SELECT {_TUNNEL_COLUMNS} FROM tunnels t WHERE t.leased_at <= ? AND NOT {_USED}"
            " ORDER BY t.id", (cutoff,))
        return [_tunnel_or_lease(row) for row in rows]

    def reset_leases_if_empty(self) -> list[Tunnel | Lease]:
        """With no contact left, release every lease (the C module's ipsec_reconfig).

        Returns what was released so the caller can remove any SAs still in the kernel. The
        rotation cursor is kept: the next lease still avoids recently used SPIs.
        """
        if self._query("SELECT 1 FROM contacts LIMIT 1") or not self._query(
                "SELECT 1 FROM tunnels LIMIT 1"):
            return []  # the common case, every sweep: no write lock taken
        with self._tx() as db:
            if db.execute("SELECT 1 FROM contacts LIMIT 1").fetchone() is not None:
                return []
            rows = db.execute(f"SELECT {_TUNNEL_COLUMNS} FROM tunnels t ORDER BY t.id")
            released = [_tunnel_or_lease(row) for row in rows]
            db.execute("DELETE FROM tunnels")
        return released

    # -- contacts ---------------------------------------------------------------------------

    def save_pending(self, aor: str, uri: str, via: Address, received: Address) -> Contact:
        """Record a REGISTER before its 200 OK (pcscf_save_pending), or refresh its contact.

        A contact is identified by (aor, received address): where its unprotected REGISTER
        came from, or one of its tunnel's phone ports on that host, which is where a
        re-REGISTER comes from. A registered contact stays registered until its own expiry.
        """
        with self._tx() as db:
            return self._get(db, self._save_binding(db, Binding(aor, uri, via, received)))

    def find_binding(self, aor: str, received: Address) -> Contact | None:
        """The contact `save_pending(aor, ..., received)` would refresh, if there is one."""
        with self._read() as db:
            found = self._binding_id(db, aor, _address(received))
            return self._get(db, found) if found is not None else None

    @staticmethod
    def _binding_id(db: sqlite3.Connection, aor: str, received: Address) -> int | None:
        found = db.execute(
            "SELECT c.id FROM contacts c LEFT JOIN tunnels t"
            " ON t.id IN (c.tunnel_id, c.pending_tunnel_id)"
            " WHERE c.aor = ? AND ((c.received_host = ? AND c.received_port = ?"
            " AND c.received_proto = ?) OR (t.ue_host = ? AND ? IN (t.port_uc, t.port_us)))"
            " ORDER BY c.id DESC LIMIT 1",
            (aor, received.host, received.port, received.proto, received.host,
             received.port)).fetchone()
        return found[0] if found is not None else None

    def _save_binding(self, db: sqlite3.Connection, b: Binding,
                      pending: int | None = None, now: float | None = None) -> int:
        """Insert or refresh the contact of a binding; with `pending`, that tunnel row becomes
        its pending tunnel in the same row write. `now`: the transaction's time, if it read
        the clock already (each read is a system call in User-mode Linux)."""
        parsed = parse_uri(b.uri)
        target = uri_target(parsed)
        transport = _transport(parsed, b.received)
        via, received = _address(b.via), _address(b.received)
        contact_id = self._binding_id(db, b.aor, received)
        if now is None:
            now = self.clock()
        pending_until = now + self.pending_lifetime
        if contact_id is None:
            return db.execute(
                "INSERT INTO contacts (aor, uri, contact_host, contact_port, via_host,"
                " via_port, via_proto, received_host, received_port, received_proto, state,"
                " expires, transport, pending_tunnel_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (b.aor, b.uri, target.host, target.port, via.host, via.port, via.proto,
                 received.host, received.port, received.proto, PENDING,
                 pending_until, transport, pending)).lastrowid
        if db.execute("SELECT 1 FROM contacts WHERE id = ? AND state = ? AND expires > ?",
                      (contact_id, REGISTERED, now)).fetchone() is not None:
            # An unprotected REGISTER proves nothing (its source may be spoofed): a live
            # registration's binding changes only through its SAs or by the core's 200 OK
            # (`register`); until then the REGISTER may only stage SAs for it.
            if pending is not None:
                db.execute("UPDATE contacts SET pending_tunnel_id = ? WHERE id = ?",
                           (pending, contact_id))
            return contact_id
        # a registration that has already ended (a de-registration whose teardown is still
        # due) starts over as pending instead of being swept away
        db.execute(
            "UPDATE contacts SET uri = ?, contact_host = ?, contact_port = ?, via_host = ?,"
            " via_port = ?, via_proto = ?, transport = ?,"
            " pending_tunnel_id = coalesce(?, pending_tunnel_id),"
            " state = CASE WHEN expires <= ? THEN ? ELSE state END,"
            " expires = CASE WHEN state = ? OR expires <= ? THEN ? ELSE expires END"
            " WHERE id = ?",
            (b.uri, target.host, target.port, via.host, via.port, via.proto, transport,
             pending, now, PENDING, PENDING, now, pending_until, contact_id))
        return contact_id

    def set_registered(self, contact_id: int, expires: float, *, uri: str | None = None,
                       received: Address | None = None) -> Contact:
        """The 200 OK to REGISTER went out: registered until `expires` (epoch seconds).

        With `uri` (the REGISTER's Contact) and `received` (where that REGISTER came from),
        the binding follows the phone: a re-registration through new SAs names its new
        protected server port, and maybe another transport, in its Contact.
        """
        with self._tx() as db:
            self._register(db, contact_id, expires, uri, received)
            return self._get(db, contact_id)

    def register(self, contact_id: int, expires: float, *, uri: str, received: Address,
                 through: int | None, associated: tuple[str, ...] | None = None,
                 service_route: tuple[str, ...] | None = None) -> Tunnel | None:
        """`set_registered`, and, when the REGISTER came through the contact's pending
        tunnel (`through` is its spi_pc), `promote` in the same transaction. Returns the
        tunnel a promotion replaced, as `promote` does. `associated` / `service_route`
        (the 200 OK's URIs) replace the contact's, when given."""
        with self._tx() as db:
            self._register(db, contact_id, expires, uri, received)
            if associated is not None or service_route is not None:
                db.execute("UPDATE contacts SET associated = coalesce(?, associated),"
                           " service_route = coalesce(?, service_route) WHERE id = ?",
                           (_lines(associated), _lines(service_route), contact_id))
            retired = self._promote(db, contact_id, through) if through is not None else None
            _ask_renewal(db, contact_id)
            return retired

    def _register(self, db: sqlite3.Connection, contact_id: int, expires: float,
                  uri: str | None, received: Address | None) -> None:
        sets, args = "state = ?, expires = ?", [REGISTERED, expires]
        if uri is not None:
            parsed = parse_uri(uri)
            target = uri_target(parsed)
            sets += ", uri = ?, contact_host = ?, contact_port = ?, transport = ?"
            args += [uri, target.host, target.port, _transport(parsed, received)]
        if db.execute(f"UPDATE contacts SET {sets} WHERE id = ?",
                      (*args, contact_id)).rowcount == 0:
            raise UnknownContact(f"contact {contact_id}")

    def stage_tunnel(self, contact_id: int, tunnel: Tunnel) -> Tunnel | None:
        """Record a tunnel on its lease as the contact's pending one, BEFORE its SAs go in.

        Written first, so that whatever happens next (the install fails, the worker dies)
        the store knows every SA and policy that may exist for it and the sweep can remove
        them. Returns the pending tunnel it replaces (a repeated challenge), still leased.
        Refused (PhoneSpiInUse) while another tunnel has one of the phone's SPIs: the kernel
        can hold only one SA per (phone address, SPI), so that one must go first.
        """
        with self._tx() as db:
            return self._stage(db, contact_id, tunnel)

    def _stage(self, db: sqlite3.Connection, contact_id: int, tunnel: Tunnel) -> Tunnel | None:
        self._refuse_phone_spis_in_use(db, tunnel)
        row = self._write_phone_side(db, tunnel)
        old = db.execute(f"SELECT {_TUNNEL_COLUMNS} FROM contacts c JOIN tunnels t"
                         " ON t.id = c.pending_tunnel_id WHERE c.id = ?", (contact_id,)).fetchone()
        if db.execute("UPDATE contacts SET pending_tunnel_id = ? WHERE id = ?",
                      (row, contact_id)).rowcount == 0:
            raise UnknownContact(f"contact {contact_id}")
        if old is None or old[0] == tunnel.lease.spi_pc:
            return None
        return _tunnel(old) if old[4] is not None else None

    def promote(self, contact_id: int, through: int | None = None) -> Tunnel | None:
        """A REGISTER came through the pending tunnel: it becomes the one in use. With
        `through` (the spi_pc of the SAs the REGISTER came through), only if that is the
        pending tunnel.

        Returns the tunnel it replaces, still leased: remove its SAs, then `release` it.
        """
        with self._tx() as db:
            return self._promote(db, contact_id, through)

    def _promote(self, db: sqlite3.Connection, contact_id: int,
                 through: int | None = None, renew: bool = False) -> Tunnel | None:
        row = db.execute(
            f"SELECT p.spi_pc, {_TUNNEL_COLUMNS} FROM contacts c JOIN tunnels p"
            " ON p.id = c.pending_tunnel_id LEFT JOIN tunnels t ON t.id = c.tunnel_id"
            " WHERE c.id = ?", (contact_id,)).fetchone()
        if row is None or (through is not None and row[0] != through):
            return None
        db.execute("UPDATE contacts SET tunnel_id = pending_tunnel_id,"
                   " pending_tunnel_id = NULL WHERE id = ?", (contact_id,))
        if renew:  # the pending tunnel's lifetime is the pending one
            _ask_renewal(db, contact_id)
        old = row[1:]
        return _tunnel(old) if old[0] is not None and old[0] != row[0] else None

    def _write_phone_side(self, db: sqlite3.Connection, tunnel: Tunnel) -> int:
        lease, ue = tunnel.lease, tunnel.ue
        row = db.execute(
            "UPDATE tunnels SET ue_host = ?, spi_uc = ?, spi_us = ?,"
            " port_uc = ?, port_us = ?, alg = ?, ealg = ?, pcscf_host = ?, keys_digest = ?,"
            " offer = ?, security_server = ?, txn = ?"
            " WHERE spi_pc = ? AND spi_ps = ? AND port_pc = ? AND port_ps = ? RETURNING id",
            (ue.host, ue.spi_uc, ue.spi_us, ue.port_uc, ue.port_us, tunnel.alg,
             tunnel.ealg, tunnel.pcscf_host, tunnel.keys_digest, tunnel.offer,
             tunnel.security_server, tunnel.txn, lease.spi_pc, lease.spi_ps, lease.port_pc,
             lease.port_ps)).fetchall()  # to the end: a RETURNING statement must finish
        if not row:
            raise NotLeased(f"{lease} is not leased")
        return row[0][0]

    def challenge(self, contact: int | Binding, through: int | None, ue: UeSide,
                  decide: Callable[[Contact | None, list[tuple[Tunnel, bool]]], Decision],
                  build: Callable[[Lease], Tunnel], avoid: Iterable[int] = (),
                  weigh: Callable[[Pressure], Verdict] | None = None,
                  spare: Iterable[int] = ()) -> Challenged:
        """What a 401 does to the phone's tunnels, in one write transaction.

        Reads the contact (by id, or the one a binding would refresh) and the tunnels whose
        SAs to this phone use one of its SPIs (only one of each can be in the kernel), each
        with whether a contact uses it; with `through` (the spi_pc of the SAs a protected
        REGISTER came through) promotes the pending tunnel first when those are it. Then acts
        on `decide(contact, clashes)`: for NEW, asks `weigh` (ipsec/limits.py) about the
        pressure on the pool first: its evictions come back in `evict` (nothing else written;
        the caller evicts, then asks again, leaving the contacts in `spare` it could not
        evict out) and its refusal as a REFUSE; then saves an unprotected REGISTER's binding,
        leases (avoiding `avoid`) and stages the tunnel `build` makes of the lease. For KEEP,
        refreshes the binding. CLEAR and REFUSE write nothing more: the caller acts.
        """
        with self._tx() as db:
            contact_id = contact if isinstance(contact, int) else self._binding_id(
                db, contact.aor, _address(contact.received))
            retired = self._promote(db, contact_id, through, renew=True) if (
                through is not None and contact_id is not None) else None
            row = None if contact_id is None else db.execute(
                f"{_CONTACT_SELECT} WHERE c.id = ?", (contact_id,)).fetchone()
            clashes = [(_tunnel(r[:-1]), bool(r[-1])) for r in db.execute(
                f"SELECT {_TUNNEL_COLUMNS}, EXISTS (SELECT 1 FROM contacts c"
                " WHERE c.tunnel_id = t.id) FROM tunnels t WHERE t.ue_host = ?"
                " AND (t.spi_uc IN (?, ?) OR t.spi_us IN (?, ?))",
                (ue.host, ue.spi_uc, ue.spi_us, ue.spi_uc, ue.spi_us))]
            now = _contact(row) if row is not None else None
            decision = decide(now, clashes)
            tunnel = replaced = None
            if decision.action == KEEP and isinstance(contact, Binding):
                self._save_binding(db, contact)
            elif decision.action == NEW and weigh is not None:
                verdict = weigh(self._pressure(db, contact, contact_id, ue, set(spare)))
                if verdict.refuse:
                    return Challenged(Decision(REFUSE, reason=verdict.refuse), contact_id,
                                      None, None, retired)
                if verdict.evict:
                    return Challenged(decision, contact_id, None, None, retired,
                                      self._hosts_of(db, verdict.evict))
            if decision.action == NEW:
                # one row write each: the tunnel whole, the contact with it as pending
                at = self.clock()
                tunnel, tunnel_id = self._lease_tunnel(db, ue, avoid, build, at)
                if isinstance(contact, Binding):
                    contact_id = self._save_binding(db, contact, pending=tunnel_id, now=at)
                elif db.execute("UPDATE contacts SET pending_tunnel_id = ? WHERE id = ?",
                                (tunnel_id, contact_id)).rowcount == 0:
                    raise UnknownContact(f"contact {contact_id}")
                if now is not None and now.pending is not None:
                    replaced = now.pending
            return Challenged(decision, contact_id, tunnel, replaced, retired)

    def _pressure(self, db: sqlite3.Connection, contact: int | Binding, own: int | None,
                  ue: UeSide, spare: set[int]) -> Pressure:
        """What ipsec/limits.py weighs: free pairs, unconfirmed contacts on this address, of
        this AoR and anywhere (oldest first; this contact and `spare` left out)."""
        skip = spare | {own}

        def ids(sql: str, args: tuple) -> tuple[int, ...]:
            return tuple(r[0] for r in db.execute(sql, args) if r[0] not in skip)

        free = self.spi_pairs - _tunnel_count(db)
        oldest = ids(f"SELECT c.id FROM contacts c WHERE c.pending_tunnel_id IS NOT NULL"
                     f" AND {_UNCONFIRMED} ORDER BY c.pending_tunnel_id LIMIT ?",
                     (len(skip) + _OLDEST_SHOWN,))
        if isinstance(contact, int):
            squatters = ids(
                f"SELECT c.id FROM tunnels t JOIN contacts c ON c.pending_tunnel_id = t.id"
                f" WHERE t.ue_host = ?1 AND (t.port_uc IN (?2, ?3) OR t.port_us IN (?2, ?3))"
                f" AND {_UNCONFIRMED}", (ue.host, ue.port_uc, ue.port_us))
            return Pressure(True, free, oldest=oldest, squatters=squatters)
        host = ids(f"SELECT c.id FROM tunnels t JOIN contacts c ON c.pending_tunnel_id = t.id"
                   f" WHERE t.ue_host = ? AND {_UNCONFIRMED} ORDER BY t.id", (ue.host,))
        aor = ids(f"SELECT c.id FROM contacts c JOIN tunnels t ON t.id = c.pending_tunnel_id"
                  f" WHERE c.aor = ? AND {_UNCONFIRMED} ORDER BY t.id", (contact.aor,))
        return Pressure(False, free, host, aor, oldest)

    @staticmethod
    def _hosts_of(db: sqlite3.Connection, contact_ids: tuple[int, ...]) -> tuple[tuple[int, str], ...]:
        marks, ids = _in_list(contact_ids)
        hosts = dict(db.execute(
            f"SELECT c.id, t.ue_host FROM contacts c JOIN tunnels t ON t.id = c.pending_tunnel_id"
            f" WHERE c.id IN ({marks})", ids).fetchall())
        return tuple((i, hosts[i]) for i in contact_ids if i in hosts)

    def evict(self, contact_ids: Iterable[int]) -> list[Tunnel]:
        """Unconfirmed contacts out (ipsec/limits.py chose them), in one transaction: those
        still unconfirmed go, with their pending tunnels, returned still leased (remove their
        SAs, then `release_all`)."""
        freed: list[Tunnel] = []
        with self._tx() as db:
            for contact_id in contact_ids:
                row = db.execute(
                    f"SELECT {_TUNNEL_COLUMNS} FROM contacts c JOIN tunnels t"
                    f" ON t.id = c.pending_tunnel_id WHERE c.id = ? AND {_UNCONFIRMED}",
                    (contact_id,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM contacts WHERE id = ?", (contact_id,))
                    freed.append(_tunnel(row))
        return freed

    def drop_stale_pending(self, older_than: float, now: float | None = None
                           ) -> list[tuple[Contact, Tunnel]]:
        """Pending tunnels staged more than `older_than` seconds ago: the phone never came
        back through them. An unconfirmed contact goes with its tunnel; a contact with SAs
        in use keeps them and loses the pending ones. One transaction; the tunnels come back
        still leased (remove their SAs, then `release_all`)."""
        cutoff = (time.time() if now is None else now) - older_than
        with self._tx() as db:
            rows = db.execute(
                # `> 0` (ids start at 1) through the pending-tunnel index: the contacts with
                # a pending tunnel, not all (the sweep asks every second)
                f"{_CONTACT_SELECT} WHERE c.pending_tunnel_id > 0 AND p.leased_at <= ?"
                " ORDER BY +c.id", (cutoff,)).fetchall()
            stale = [_contact(row) for row in rows]
            for c in stale:
                if c.tunnel is None and c.state == PENDING:
                    db.execute("DELETE FROM contacts WHERE id = ?", (c.id,))
                else:
                    db.execute("UPDATE contacts SET pending_tunnel_id = NULL WHERE id = ?",
                               (c.id,))
        return [(c, c.pending) for c in stale]

    def set_tunnel(self, contact_id: int, tunnel: Tunnel) -> Tunnel | None:
        """Attach installed SAs (on a lease we hold) to a contact, in one transaction.

        Returns the tunnel it replaces, still leased: remove its SAs once the new ones are in
        place, then `release` it. None for a first tunnel or when re-attaching the same one.
        """
        lease = tunnel.lease
        with self._tx() as db:
            row = self._write_phone_side(db, tunnel)
            old = self._get(db, contact_id).tunnel
            db.execute("UPDATE contacts SET tunnel_id = ? WHERE id = ?", (row, contact_id))
        return old if old is not None and old.lease != lease else None

    def delete_contacts(self, contact_ids: Iterable[int], *,
                        expired_at: tuple[float, float] | None = None) -> list[Tunnel]:
        """Forget contacts, in one transaction; returns their tunnels (in use or pending)
        that no other contact uses.

        The tunnels stay leased: remove their SAs (after the last reply has left through
        them), then `release_all` them. A contact already gone is skipped, as racing sweeps
        may meet. With `expired_at=(now, grace)` a contact goes only if it is still expired
        as `expired` says: another worker may have refreshed it since the sweep listed it.
        """
        freed: list[Tunnel] = []
        with self._tx() as db:
            for contact_id in contact_ids:
                freed += self._delete_contact(db, contact_id, expired_at)
        return freed

    def _delete_contact(self, db: sqlite3.Connection, contact_id: int,
                        expired_at: tuple[float, float] | None) -> list[Tunnel]:
        try:
            contact = self._get(db, contact_id)
        except UnknownContact:
            return []
        where, args = "id = ?", (contact_id,)
        if expired_at is not None:
            now, grace = expired_at
            where += " AND ((state = ? AND expires <= ?) OR (state = ? AND expires <= ?))"
            args += (REGISTERED, now - grace, PENDING, now)
        if db.execute(f"DELETE FROM contacts WHERE {where}", args).rowcount == 0:
            return []
        # does another contact use it? Two index look-ups (a join on `t.id IN (c.tunnel_id,
        # c.pending_tunnel_id)` read every contact at each de-registration and expiry)
        return [t for t in (contact.tunnel, contact.pending) if t is not None and not db.execute(
            "SELECT 1 FROM tunnels t WHERE t.spi_pc = ? AND (EXISTS (SELECT 1 FROM contacts c"
            " WHERE c.tunnel_id = t.id) OR EXISTS (SELECT 1 FROM contacts c"
            " WHERE c.pending_tunnel_id = t.id))", (t.lease.spi_pc,)).fetchone()]

    def ask_renewals_of_registered(self) -> int:
        """A renewal request for every registered contact with a tunnel in use (start-up:
        the tunnels kept get the lifetime the store says); returns how many were asked."""
        with self._tx() as db:
            return db.execute(
                "INSERT INTO renewals (contact_id, seq) SELECT id, 1 FROM contacts"
                " WHERE state = ? AND tunnel_id IS NOT NULL"
                " ON CONFLICT (contact_id) DO UPDATE SET seq = seq + 1", (REGISTERED,)).rowcount

    def renewals_due(self, limit: int, after: int = 0) -> list[tuple[int, int]]:
        """Up to `limit` requests to renew a contact's kernel lifetime, of contacts after
        `after` in id order: (contact id, seq)."""
        return [(r[0], r[1]) for r in self._query(
            "SELECT contact_id, seq FROM renewals WHERE contact_id > ? ORDER BY contact_id"
            " LIMIT ?", (after, limit))]

    def renewed(self, done: Iterable[tuple[int, int]]) -> None:
        """These requests were served: they go, unless asked again since (`seq` moved)."""
        done = list(done)
        if done:
            with self._tx() as db:
                db.executemany("DELETE FROM renewals WHERE contact_id = ? AND seq = ?", done)

    def leased_at(self, spi_pcs: Iterable[int]) -> dict[int, float]:
        """When these leases (by spi_pc) were taken: their SAs went in after."""
        spis = sorted(set(spi_pcs))
        found: dict[int, float] = {}
        with self._read() as db:
            for i in range(0, len(spis), 512):
                marks, chunk = _in_list(spis[i:i + 512])
                found.update(db.execute(
                    f"SELECT spi_pc, leased_at FROM tunnels WHERE spi_pc IN ({marks})", chunk))
        return found

    def get_contacts(self, contact_ids: Iterable[int]) -> list[Contact]:
        """These contacts, those that still exist, in id order."""
        ids = sorted(set(contact_ids))
        found: list[Contact] = []
        with self._read() as db:
            for i in range(0, len(ids), 512):
                marks, chunk = _in_list(ids[i:i + 512])
                found += [_contact(r) for r in db.execute(
                    f"{_CONTACT_SELECT} WHERE c.id IN ({marks}) ORDER BY c.id", chunk)]
        return found

    def get_contact(self, contact_id: int) -> Contact | None:
        found = self._contacts("c.id = ?", (contact_id,), order="c.id")
        return found[0] if found else None

    def expired(self, now: float, grace: float) -> list[Contact]:
        """Contacts to tear down: registered ones `grace` seconds past their expiry (the SAs
        outlive the registration a little, as 33.203 asks), pending ones at their end."""
        # the first bound (the later of the two) lets the expires index give a range, not a
        # walk through every contact (the sweep asks every second)
        return self._contacts(
            "c.expires <= ? AND ((c.state = ? AND c.expires <= ?) OR (c.state = ? AND c.expires <= ?))",
            (max(now, now - grace), REGISTERED, now - grace, PENDING, now),
            order="c.expires, c.id")

    # -- look-ups: one per rule of the module functions ---------------------------------------

    def find_by_uri(self, uri: str, *, use_alias: bool = True, newest_first: bool = True,
                    aor: str | None = None) -> Contact | None:
        """The registered phone a request is addressed to (R-URI, destination URI or new R-URI).

        With an `alias=ip~port~proto` parameter (and `use_alias`), the phone is where the alias
        says: its received address, or its contact port on that host. Without, the URI's own
        host and port are the contact URI's, or a received address.

        Only a registered contact with a tunnel in use is a candidate (a pending one has
        proved nothing), and only one that owns the address: the URI's host is where its SAs
        go, or the request is for its AoR (`aor`: the request's To). Among several, the one
        of that AoR first, then the newest (`newest_first`) or oldest. So a REGISTER naming
        someone else's contact URI, authenticated or not, never takes that phone's requests.
        """
        parsed = parse_uri(uri)
        alias = alias_target(parsed) if use_alias else None
        if alias is not None:
            host, where = alias.host, "c.received_host = ?1 AND ?2 IN (c.received_port, c.contact_port)"
            port = alias.port
        else:
            target = uri_target(parsed)
            host, port = target.host, target.port
            where = ("((c.contact_host = ?1 AND c.contact_port = ?2)"
                     " OR (c.received_host = ?1 AND c.received_port = ?2))")
        order = "c.id DESC" if newest_first else "c.id"
        rows = self._query(
            f"{_CONTACT_SELECT} WHERE {where} AND c.state = ?3 AND c.tunnel_id IS NOT NULL"
            f" AND (t.ue_host = ?1 OR c.aor = ?4) ORDER BY (c.aor = ?4) DESC, {order} LIMIT 1",
            (host, port, REGISTERED, aor))
        return _contact(rows[0]) if rows else None

    def find_by_source(self, host: str, port: int, *,
                       newest_first: bool = True) -> Contact | None:
        """The contact whose tunnel (in use or pending) a request came through: from one of the
        phone's protected ports (port_uc or port_us) on its address. Either transport: the SAs
        carry both."""
        host = normalize_host(host)
        # two steps (SQLite plans "tunnel_id IN (subquery) OR ..." several times slower), in
        # one read transaction
        with self._read() as db:
            ids = [row[0] for row in db.execute(
                "SELECT id FROM tunnels WHERE ue_host = ?1 AND port_uc = ?2 UNION ALL"
                " SELECT id FROM tunnels WHERE ue_host = ?1 AND port_us = ?2", (host, port))]
            if not ids:
                return None
            marks, ids = _in_list(ids)
            order = "c.id DESC" if newest_first else "c.id"
            row = db.execute(f"{_CONTACT_SELECT} WHERE c.tunnel_id IN ({marks}) OR"
                             f" c.pending_tunnel_id IN ({marks}) ORDER BY {order} LIMIT 1",
                             ids * 2).fetchone()
        return _contact(row) if row is not None else None

    def find_by_flow(self, host: str, port: int, local_port: int) -> Contact | None:
        """The contact whose SAs carry a protected request: from the phone's `port` (its
        port_uc to our port_ps, or its port_us to our port_pc) on `host`, to our
        `local_port`; `pending` holds which of its tunnels that is when it is the pending
        one. A tunnel in use wins over a pending one, whatever their age: a pending tunnel
        is only the word of an unprotected REGISTER, whose source anyone can spoof, and must
        never take a live phone's requests (the newest contact wins among equals)."""
        host = normalize_host(host)
        with self._read() as db:
            ids = [row[0] for row in db.execute(
                _FLOW_TUNNELS.format("id"), (host, port, local_port))]
            found = _newest_user(db, ids)
        return found[0] if found else None

    def is_tunnel_flow(self, host: str, port: int, local_port: int) -> bool:
        """Is there a tunnel whose SAs carry packets from the phone's `port` on `host` to our
        `local_port` (port_uc -> port_ps, or port_us -> port_pc)? One statement, no contact:
        the kernel's policy for that flow exists exactly when the tunnel does (the state
        invariant), and it lets nothing in on that flow but ESP."""
        return bool(self._query(_FLOW_TUNNELS.format("1") + " LIMIT 1",
                                (normalize_host(host), port, local_port)))

    def is_phone_host(self, host: str) -> bool:
        """Does any tunnel (in use or staged) have its phone side at `host`?"""
        row = self._query("SELECT 1 FROM tunnels WHERE ue_host = ? LIMIT 1",
                          (normalize_host(host),))
        return bool(row)

    def find_by_phone_port(self, host: str, port: int) -> Contact | None:
        """The contact with a tunnel whose phone side is `host`:`port` (its protected client or
        server port), `tunnel` set to that tunnel; the one in use wins over a pending one, as
        in find_by_flow. A reply that matches no transaction may reach a phone only through
        such SAs."""
        host = normalize_host(host)
        with self._read() as db:
            ids = [row[0] for row in db.execute(
                "SELECT id FROM tunnels WHERE ue_host = ?1 AND port_uc = ?2"
                " UNION SELECT id FROM tunnels WHERE ue_host = ?1 AND port_us = ?2",
                (host, port))]
            found = _newest_user(db, ids)
        if found is None:
            return None
        contact, pending = found
        return replace(contact, tunnel=contact.pending) if pending else contact

    def find_by_received(self, received: Address, *,
                         newest_first: bool = True) -> Contact | None:
        """The contact whose unprotected REGISTER came from this address (ipsec_create finds
        the pending contact through the 401's transaction request this way)."""
        received = _address(received)
        return self._first(
            "c.received_host = ? AND c.received_port = ? AND c.received_proto = ?",
            (received.host, received.port, received.proto), newest_first)

    def find_by_aor_received(self, aor: str, host: str, port: int, *,
                             newest_first: bool = True) -> Contact | None:
        """ipsec_destroy_by_contact(domain, aor, recv_host, recv_port): `aor` may be the AoR
        or the contact URI (the C registry keys contacts by the latter)."""
        return self._first(
            "(c.aor = ? OR c.uri = ?) AND c.received_host = ? AND c.received_port = ?",
            (aor, aor, normalize_host(host), port), newest_first)

    def find_by_aor(self, aor: str) -> list[Contact]:
        """Every contact of an AoR (or with this contact URI), oldest first: ipsec_destroy.

        The contact URI is matched through its host and port (the contacts_contact index):
        `c.uri = ?` alone has no index and read every contact at each call."""
        try:
            target = uri_target(parse_uri(aor))
        except SipUriError:  # no stored contact URI is unparsable: the AoR alone
            return self._contacts("c.aor = ?", (aor,), order="c.id")
        return self._contacts(
            "c.aor = ?1 OR (c.contact_host = ?2 AND c.contact_port = ?3 AND c.uri = ?1)",
            (aor, target.host, target.port), order="c.id")

    # -- helpers ----------------------------------------------------------------------------

    def _first(self, where: str, args: tuple, newest_first: bool) -> Contact | None:
        order = "c.id DESC" if newest_first else "c.id"
        found = self._contacts(where, args, order=order, limit=1)
        return found[0] if found else None

    def _contacts(self, where: str, args: tuple, *, order: str,
                  limit: int | None = None) -> list[Contact]:
        sql = f"{_CONTACT_SELECT} WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_contact(row) for row in self._query(sql, args)]

    @staticmethod
    def _get(db: sqlite3.Connection, contact_id: int) -> Contact:
        row = db.execute(f"{_CONTACT_SELECT} WHERE c.id = ?", (contact_id,)).fetchone()
        if row is None:
            raise UnknownContact(f"contact {contact_id}")
        return _contact(row)

    # == the operator's view (ipsec/cli) =======================================================
    # Read-only: plain SELECTs outside any transaction, so the command line never holds a lock
    # a Kamailio worker waits for. Nothing the module calls lives below this line.

    def contacts_matching(self, *, aor: str | None = None,
                          host: str | None = None) -> list[Contact]:
        """Contacts, oldest first: all, or those of an AoR (or contact URI), or those whose
        unprotected address or tunnel (in use or pending) is on `host`."""
        where, args = ["1"], []
        if aor is not None:
            where.append("(c.aor = ? OR c.uri = ?)")
            args += [aor, aor]
        if host is not None:
            where.append("(c.received_host = ? OR t.ue_host = ? OR p.ue_host = ?)")
            args += [normalize_host(host)] * 3
        return self._contacts(" AND ".join(where), tuple(args), order="c.id")

    def leases_with_age(self) -> list[tuple[Tunnel | Lease, float]]:
        """Every lease with the time it was taken: a Tunnel once its phone side is staged,
        a bare Lease before that. Whether a contact uses it is in `contacts_matching`."""
        rows = self._query(f"SELECT {_TUNNEL_COLUMNS}, t.leased_at FROM tunnels t ORDER BY t.id")
        return [(_tunnel_or_lease(row[:-1]), row[-1]) for row in rows]

    def usage(self) -> tuple[int, int, int]:
        """(SPI pairs leased, SPI pairs in the range, tunnels a contact uses): the gauges the
        sweep publishes each second (one snapshot)."""
        with self._read() as db:
            leased = _tunnel_count(db)
            used = db.execute(f"SELECT COUNT(*) FROM tunnels t WHERE {_USED}").fetchone()[0]
        return leased, (self.spi_last_pair - self.spi_start) // 2 + 1, used

    def mark_deregistered(self, contact_id: int) -> None:
        """A de-registration whose tunnel the sweep removes after its reply has left: noted
        (a `meta` row) so the sweep counts that removal as a de-registration, not an expiry."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, 1)",
                       (f"dereg:{contact_id}",))

    def take_deregistered(self, contact_ids: Iterable[int]) -> set[int]:
        """Which of these contacts `mark_deregistered` noted; the notes go."""
        keys = [f"dereg:{i}" for i in contact_ids]
        if not keys:
            return set()
        found: set[int] = set()
        with self._tx() as db:
            for i in range(0, len(keys), 512):
                marks, chunk = _in_list(keys[i:i + 512])
                got = {int(k.split(":")[1]) for (k,) in db.execute(
                    f"SELECT key FROM meta WHERE key IN ({marks})", chunk)}
                if got:
                    db.execute(f"DELETE FROM meta WHERE key IN ({marks})", chunk)
                found |= got
        return found

    def note_operator_removals(self, n: int) -> None:
        """`ims-ipsec drop`/`flush` removed `n` tunnels behind Kamailio's back: noted (a
        `meta` row) for the sweep to add to Kamailio's statistics."""
        if n <= 0:
            return
        with self._tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('operator_removed', ?)"
                       " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value", (n,))

    def take_operator_removals(self) -> int:
        """How many removals `note_operator_removals` noted since the last call (a read when
        there are none, so the sweep's second costs no write)."""
        row = self._query("SELECT value FROM meta WHERE key = 'operator_removed'")
        if not row or not row[0][0]:
            return 0
        with self._tx() as db:
            n = db.execute("SELECT value FROM meta WHERE key = 'operator_removed'").fetchone()[0]
            db.execute("DELETE FROM meta WHERE key = 'operator_removed'")
        return int(n)

    def health(self) -> dict[str, object]:
        """What `ims-ipsec doctor` checks of the file itself (opening it already refused a
        schema of another version)."""
        meta = dict(self._query("SELECT key, value FROM meta WHERE key != 'secret'"))
        return {
            "schema_version": meta.get("schema_version"),
            "next_spi": meta.get("next_spi"),
            "next_port": meta.get("next_port"),
            "journal_mode": self._query("PRAGMA journal_mode")[0][0],
            "quick_check": [row[0] for row in self._query("PRAGMA quick_check")],
        }


@contextmanager
def _sqlite_errors(path: str) -> Iterator[None]:
    """SQLite and file errors (locked past the busy timeout, disk full, bad path) become
    StoreError, so callers handle one family of our failures."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"store {path}: {exc}") from exc


@dataclass(frozen=True)
class Challenged:
    """What `Store.challenge` did: the decision, the contact's id (None: none yet), the new
    tunnel staged (NEW) and the pending one it replaced, and the tunnel a promotion retired
    (both still leased: remove their SAs, then release them)."""

    decision: Decision
    contact_id: int | None
    tunnel: Tunnel | None
    replaced: Tunnel | None
    retired: Tunnel | None
    evict: tuple[tuple[int, str], ...] = ()  # (contact id, phone address) to evict first


def _tunnel_count(db: sqlite3.Connection) -> int:
    """Rows of `tunnels` (leases), as the schema's triggers keep it (schema.COUNTED)."""
    return db.execute("SELECT value FROM meta WHERE key = 'tunnel_count'").fetchone()[0]


def _ask_renewal(db: sqlite3.Connection, contact_id: int) -> None:
    """Ask the sweep to renew the kernel lifetime of the contact's tunnel in use (one row per
    contact; asking again while a request waits moves its `seq`)."""
    db.execute("INSERT INTO renewals (contact_id, seq) VALUES (?, 1)"
               " ON CONFLICT (contact_id) DO UPDATE SET seq = seq + 1", (contact_id,))


def _in_list(values: Iterable) -> tuple[str, tuple]:
    """Placeholders for an IN list and its values, padded to a power of two by repeating the
    last value. Every distinct SQL text is a statement the connection prepares and keeps
    (Python's sqlite3 caches 128 per connection), and its memory grows with the list: the
    sweep's batches (leases given back, de-registration notes taken) vary in size with the
    traffic, and sizes 1 to 300 through the store held 10.3 MB of SQLite memory in one
    process (sqlite3_memory_used, tests/unit/test_store_upkeep.py). Powers of two keep it to
    10 texts per query (< 0.5 MB)."""
    values = tuple(values)
    if not values:
        return "NULL", ()  # IN (NULL) matches nothing
    size = 1
    while size < len(values):
        size *= 2
    padded = values + values[-1:] * (size - len(values))
    return ",".join("?" * size), padded


def _transport(uri: SipUri, received: Address | None) -> str:
    """How to reach a phone: its Contact's transport parameter, else how it reached us."""
    asked = uri.params.get("transport", "").lower()
    if asked in TRANSPORTS:
        return asked
    return received.proto if received is not None else "udp"


def _address(addr: Address) -> Address:
    """Accept any host/port/proto object, compared in the store's one spelling of hosts."""
    return Address(addr.host, addr.port, addr.proto)


def _lines(uris: tuple[str, ...] | None) -> str | None:
    """URIs one per line (a URI read from a header holds no line break)."""
    return None if uris is None else "\n".join(u for u in uris if "\n" not in u)


# the tunnels whose SAs carry a phone's flow host:?2 -> our ?3 (port_uc -> port_ps, or
# port_us -> port_pc), selecting {}
_FLOW_TUNNELS = ("SELECT {0} FROM tunnels WHERE ue_host = ?1 AND port_uc = ?2 AND port_ps = ?3"
                 " UNION ALL SELECT {0} FROM tunnels WHERE ue_host = ?1 AND port_us = ?2"
                 " AND port_pc = ?3")


def _newest_user(db: sqlite3.Connection, tunnel_ids: list[int]) -> tuple[Contact, bool] | None:
    """The newest contact using one of these tunnels, and whether as its pending one: a
    tunnel in use wins over a pending one, whatever their age (see Store.find_by_flow)."""
    if not tunnel_ids:
        return None
    marks, ids = _in_list(tunnel_ids)
    for column in ("tunnel_id", "pending_tunnel_id"):
        row = db.execute(f"{_CONTACT_SELECT} WHERE c.{column} IN ({marks})"
                         " ORDER BY c.id DESC LIMIT 1", ids).fetchone()
        if row is not None:
            return _contact(row), column == "pending_tunnel_id"
    return None


def _contact(row: tuple) -> Contact:
    used, staged = row[_NC:_NC + _NT], row[_NC + _NT:_NC + 2 * _NT]
    return Contact(id=row[0], aor=row[1], uri=row[2], via=Address(row[3], row[4], row[5]),
                   received=Address(row[6], row[7], row[8]), state=row[9], expires=row[10],
                   transport=row[11], tunnel=_tunnel(used) if used[4] is not None else None,
                   pending=_tunnel(staged) if staged[4] is not None else None,
                   associated=tuple(row[12].split("\n")) if row[12] else (),
                   service_route=tuple(row[13].split("\n")) if row[13] else ())


def _tunnel(row: tuple) -> Tunnel:
    (spi_pc, spi_ps, port_pc, port_ps, ue_host, spi_uc, spi_us, port_uc, port_us, alg, ealg,
     pcscf_host, digest, offer, security_server, txn) = row
    return Tunnel(Lease(spi_pc, spi_ps, port_pc, port_ps),
                  UeSide(ue_host, spi_uc, spi_us, port_uc, port_us), alg, ealg, pcscf_host,
                  bytes(digest), offer, security_server, bytes(txn or b""))


def _tunnel_or_lease(row: tuple) -> Tunnel | Lease:
    return _tunnel(row) if row[4] is not None else Lease(*row[:4])
