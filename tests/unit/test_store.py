"""ipsec.store in one process: leases, contacts, every look-up rule, the file itself."""
from __future__ import annotations

import os
import sqlite3
import time

import pytest

from ipsec.sipuri import Address
from ipsec.store import (PENDING, REGISTERED, Lease, NotLeased, SchemaMismatch, SpiExhausted,
                         Store, StoreError, Tunnel, UeSide, UnknownContact, keep_tunnel)

CK = bytes.fromhex("0123456789abcdef0123456789abcdef")
IK = bytes.fromhex("fedcba9876543210fedcba9876543210")


def make(path, **overrides) -> Store:
    params = dict(spi_start=1000, spi_range=20, client_port=5100, server_port=5200,
                  max_connections=2)
    params.update(overrides)
    return Store(str(path), **params)


@pytest.fixture
def store(tmp_path):
    s = make(tmp_path / "ipsec.db")
    yield s
    s.close()


def tunnel_on(store: Store, lease: Lease, host="10.0.0.1", spi_uc=11, spi_us=12, port_uc=6100,
              port_us=6200, ck=CK, ik=IK) -> Tunnel:
    return Tunnel(lease, UeSide(host, spi_uc, spi_us, port_uc, port_us), "hmac-sha-1-96",
                  "aes-cbc", "192.0.2.1", store.keys_digest(ck, ik),
                  "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;spi-c=11;spi-s=12",
                  f"ipsec-3gpp;spi-c={lease.spi_pc};spi-s={lease.spi_ps}")


def pending(store: Store, aor="sip:alice@ims.example", host="10.0.0.1", port=5060,
            proto="udp", uri=None):
    uri = uri or f"sip:alice@{host}:{port}"
    return store.save_pending(aor, uri, Address(host, port, proto), Address(host, port, proto))


def registered_with_tunnel(store: Store, host="10.0.0.1", port=5060, port_uc=6100,
                           port_us=6200, aor="sip:alice@ims.example", uri=None):
    contact = pending(store, aor=aor, host=host, port=port, uri=uri)
    lease = store.lease(host)
    store.set_tunnel(contact.id, tunnel_on(store, lease, host, port_uc=port_uc, port_us=port_us))
    return store.set_registered(contact.id, time.time() + 3600)


# -- the file ------------------------------------------------------------------------------

def test_files_are_private_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        s = make(tmp_path / "ipsec.db")
        s.lease()
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["ipsec.db", "ipsec.db-shm", "ipsec.db-wal", "ipsec.db.lock"]
        for p in tmp_path.iterdir():
            assert p.stat().st_mode & 0o777 == 0o600, p
        s.close()
    finally:
        os.umask(old)


def test_schema_has_a_version_and_wal(store):
    store.lease()
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (8,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


def test_a_file_of_another_schema_version_is_refused(tmp_path):
    s = make(tmp_path / "ipsec.db")
    s.lease()
    s.close()
    db = sqlite3.connect(tmp_path / "ipsec.db")
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(SchemaMismatch):
        make(tmp_path / "ipsec.db").lease()


# The schema of version 2 as it shipped (ipsec/store/schema.py at that version).
V2_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE tunnels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spi_pc INTEGER NOT NULL UNIQUE,
    spi_ps INTEGER NOT NULL UNIQUE,
    port_pc INTEGER NOT NULL,
    port_ps INTEGER NOT NULL,
    port_index INTEGER NOT NULL,
    lease_host TEXT,
    leased_at REAL NOT NULL,
    ue_host TEXT, spi_uc INTEGER, spi_us INTEGER, port_uc INTEGER, port_us INTEGER,
    alg TEXT, ealg TEXT, pcscf_host TEXT, keys_digest BLOB, offer TEXT, security_server TEXT
);
CREATE INDEX tunnels_lease_host ON tunnels (lease_host);
CREATE INDEX tunnels_ue_uc ON tunnels (ue_host, port_uc);
CREATE INDEX tunnels_ue_us ON tunnels (ue_host, port_us);
CREATE TABLE spis (
    spi INTEGER PRIMARY KEY,
    tunnel_id INTEGER NOT NULL REFERENCES tunnels (id) ON DELETE CASCADE
);
CREATE INDEX spis_tunnel ON spis (tunnel_id);
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
    UNIQUE (aor, received_host, received_port, received_proto)
);
CREATE INDEX contacts_received ON contacts (received_host, received_port);
CREATE INDEX contacts_contact ON contacts (contact_host, contact_port);
CREATE INDEX contacts_expires ON contacts (expires);
CREATE INDEX contacts_tunnel ON contacts (tunnel_id);
CREATE INDEX contacts_pending_tunnel ON contacts (pending_tunnel_id);
"""


def test_a_version_2_file_is_upgraded_in_place_keeping_its_phones(tmp_path):
    """A P-CSCF upgraded under running phones keeps them: v2 had no tunnel transaction key
    and no contact transport (requests followed the REGISTER's protocol), and an spis table
    and indexes v4 does without."""
    path = tmp_path / "ipsec.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in V2_DDL.split(";"):
        if statement.strip():
            db.execute(statement)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [
        ("schema_version", 2), ("secret", b"s" * 32), ("next_spi", 1002), ("next_port", 1)])
    db.execute("INSERT INTO tunnels (id, spi_pc, spi_ps, port_pc, port_ps, port_index, lease_host,"
               " leased_at, ue_host, spi_uc, spi_us, port_uc, port_us, alg, ealg, pcscf_host,"
               " keys_digest, offer, security_server) VALUES (1, 1000, 1001, 5100, 5200, 0,"
               " '10.0.0.1', 0, '10.0.0.1', 11, 12, 6100, 6200, 'hmac-sha-1-96', 'aes-cbc',"
               " '192.0.2.1', x'00', 'offer', 'server')")
    db.executemany("INSERT INTO spis VALUES (?, 1)", [(1000,), (1001,)])
    for n, (host, proto, tunnel) in enumerate((("10.0.0.1", "udp", 1), ("10.0.0.5", "tcp", None))):
        db.execute("INSERT INTO contacts (aor, uri, contact_host, contact_port, via_host, via_port,"
                   " via_proto, received_host, received_port, received_proto, state, expires,"
                   " tunnel_id) VALUES (?, ?, ?, 5060, ?, 5060, ?, ?, 5060, ?, 'registered', ?, ?)",
                   (f"sip:u{n}@ims.example", f"sip:u{n}@{host}:5060", host, host, proto, host,
                    proto, time.time() + 3600, tunnel))
    db.close()
    s = make(path)
    (alice,) = s.find_by_aor("sip:u0@ims.example")
    (bob,) = s.find_by_aor("sip:u1@ims.example")
    assert alice.state == REGISTERED and alice.tunnel.lease == Lease(1000, 1001, 5100, 5200)
    assert (alice.transport, bob.transport) == ("udp", "tcp")
    assert (alice.associated, alice.service_route) == ((), ())  # v5: none before a 200 OK
    assert s.lease("10.0.0.9").spi_pc == 1002  # the cursor survived; 1000 is still taken
    count = "SELECT value FROM meta WHERE key = 'tunnel_count'"
    assert s._db().execute(count).fetchone() == (2,)  # v6: counted at the upgrade
    assert not s.release(Lease(1004, 1005, 5100, 5200)) and s.release(alice.tunnel.lease)
    assert s._db().execute(count).fetchone() == (1,)
    assert s._db().execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (8,)
    s.register(bob.id, time.time() + 600, uri=bob.uri, received=bob.received, through=None)
    assert s.renewals_due(10) == [(bob.id, 1)]  # v7: the sweep's renewal requests
    for name, column in (("contacts_tunnel", "tunnel_id"),
                         ("contacts_pending_tunnel", "pending_tunnel_id")):  # v8: partial
        (sql,) = s._db().execute("SELECT sql FROM sqlite_master WHERE name = ?",
                                 (name,)).fetchone()
        assert sql.endswith(f"WHERE {column} IS NOT NULL")
    s.close()


def test_no_ck_or_ik_reaches_the_file(store):
    contact = pending(store)
    store.set_tunnel(contact.id, tunnel_on(store, store.lease("10.0.0.1")))
    raw = b"".join(open(store.path + suffix, "rb").read() for suffix in ("", "-wal"))
    for key in (CK, IK, CK + IK):
        for form in (key, key.hex().encode(), key.hex().upper().encode()):
            assert form not in raw


def test_keys_digest_is_keyed_per_store_and_shared_by_its_users(tmp_path):
    a, a2, b = make(tmp_path / "a.db"), make(tmp_path / "a.db"), make(tmp_path / "b.db")
    assert a.keys_digest(CK, IK) == a2.keys_digest(CK, IK)
    assert a.keys_digest(CK, IK) != b.keys_digest(CK, IK)
    assert a.keys_digest(CK, IK) != a.keys_digest(IK, CK)


def test_a_forked_child_opens_its_own_connection(store):
    store.lease()
    parent_conn = store._db()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = store._db() is not parent_conn and store.lease().spi_pc == 1002
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert store._db() is parent_conn
    assert store.lease().spi_pc == 1004


def test_sqlite_and_file_failures_are_store_errors(tmp_path):
    with pytest.raises(StoreError, match="missing"):
        make(tmp_path / "missing" / "ipsec.db").lease()
    s = make(tmp_path / "ipsec.db", busy_timeout=0.05)
    s.lease()
    holder = sqlite3.connect(s.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked"):
        s.lease()
    holder.execute("ROLLBACK")
    assert s.lease().spi_pc == 1002  # the failed attempt left nothing behind


def test_close_then_use_reopens(store):
    store.lease()
    store.close()
    assert store.lease().spi_pc == 1002


@pytest.mark.parametrize("kwargs", [
    dict(spi_start=0), dict(spi_range=1), dict(spi_start=0xFFFFFFFF, spi_range=2),
    dict(max_connections=0), dict(client_port=65535, max_connections=2),
])
def test_unusable_parameters_are_refused(tmp_path, kwargs):
    with pytest.raises(StoreError):
        make(tmp_path / "ipsec.db", **kwargs)


# -- leases --------------------------------------------------------------------------------

def test_spis_come_in_pairs_from_the_range_until_exhausted(store):
    leases = [store.lease() for _ in range(10)]
    assert [(l.spi_pc, l.spi_ps) for l in leases] == [(1000 + 2 * i, 1001 + 2 * i)
                                                       for i in range(10)]
    with pytest.raises(SpiExhausted):
        store.lease()
    assert store.release(leases[3])
    assert store.lease().spi_pc == 1006
    with pytest.raises(SpiExhausted):
        store.lease()


def test_an_odd_range_leaves_its_last_spi_unused(tmp_path):
    s = make(tmp_path / "ipsec.db", spi_range=5)
    assert [s.lease().spi_ps for _ in range(2)] == [1001, 1003]
    with pytest.raises(SpiExhausted):
        s.lease()


def test_a_released_spi_comes_back_last(store):
    first = store.lease()
    store.release(first)
    seen = [store.lease().spi_pc for _ in range(9)]
    assert first.spi_pc not in seen
    assert store.lease().spi_pc == first.spi_pc


def test_release_by_either_spi_and_twice(store):
    a, b = store.lease(), store.lease()
    assert store.release(a.spi_ps) and store.release(b.spi_pc)
    assert not store.release(a) and not store.release(b.spi_ps) and not store.release(4242)


def test_avoided_spis_are_skipped_and_can_exhaust(store):
    refused = store.lease()
    store.release(refused)
    retry = store.lease(avoid={refused.spi_ps, 1002})
    assert retry.spi_pc == 1004
    with pytest.raises(SpiExhausted):
        store.lease(avoid=range(1000, 1020))


def test_a_changed_range_leases_from_the_new_one(tmp_path):
    make(tmp_path / "ipsec.db").lease()
    moved = make(tmp_path / "ipsec.db", spi_start=2001, spi_range=4)
    assert [moved.lease().spi_pc for _ in range(2)] == [2001, 2003]


def test_ports_rotate_and_are_shared_by_more_phones_than_connections(store):
    ports = [(l.port_pc, l.port_ps) for l in (store.lease(f"10.0.0.{i}") for i in range(5))]
    assert ports == [(5100, 5200), (5101, 5201), (5100, 5200), (5101, 5201), (5100, 5200)]


def test_a_phone_never_gets_its_live_tunnels_port_pair(store):
    contact = pending(store)
    first = store.lease("10.0.0.1")
    store.set_tunnel(contact.id, tunnel_on(store, first))
    store.lease("10.0.0.2")  # moves the rotation back onto the first phone's pair
    again = store.lease("10.0.0.1")
    assert (again.port_pc, again.port_ps) != (first.port_pc, first.port_ps)


def test_with_one_connection_every_lease_uses_the_one_pair(tmp_path):
    s = make(tmp_path / "ipsec.db", max_connections=1)
    assert {(s.lease("10.0.0.1").port_pc) for _ in range(3)} == {5100}


def test_release_detaches_the_tunnel_from_its_contact(store):
    contact = registered_with_tunnel(store)
    assert store.release(contact.tunnel.lease)
    assert store.get_contact(contact.id).tunnel is None


# -- contacts ------------------------------------------------------------------------------

def test_save_pending_records_and_refreshes_one_contact(store):
    before = time.time()
    c = pending(store)
    assert (c.state, c.tunnel, c.received) == (PENDING, None, Address("10.0.0.1", 5060, "udp"))
    assert before + 240 <= c.expires <= time.time() + 240
    assert pending(store).id == c.id
    assert pending(store, port=5070).id != c.id
    assert pending(store, aor="sip:bob@ims.example").id != c.id


def test_an_unprotected_register_leaves_a_registered_binding_as_it_is(store):
    """From the phone's tunnel ports or its unprotected address, with its AoR: the same
    contact, unchanged (anyone can spoof that source; only a REGISTER through the SAs, or
    the core's 200 OK, changes a registered binding: `register`). Before, the Contact URI,
    Via and transport were rewritten (issue 10, finding 6)."""
    c = registered_with_tunnel(store)
    for src in (Address("10.0.0.1", 6100, "tcp"), c.received):
        again = store.save_pending(c.aor, "sip:mallory@10.9.9.9:7000", src, src)
        assert again.id == c.id
        assert again == c


def test_set_registered_and_unknown_contacts(store):
    c = store.set_registered(pending(store).id, 12345.0)
    assert (c.state, c.expires) == (REGISTERED, 12345.0)
    with pytest.raises(UnknownContact):
        store.set_registered(999, 1.0)
    with pytest.raises(UnknownContact):
        store.set_tunnel(999, tunnel_on(store, store.lease()))
    assert store.get_contact(999) is None


def test_set_tunnel_needs_a_held_lease(store):
    c = pending(store)
    lease = store.lease()
    store.release(lease)
    with pytest.raises(NotLeased):
        store.set_tunnel(c.id, tunnel_on(store, lease))
    other = store.lease()
    forged = Lease(other.spi_pc, other.spi_ps, other.port_pc + 7, other.port_ps)
    with pytest.raises(NotLeased):
        store.set_tunnel(c.id, tunnel_on(store, forged))


def test_the_contact_carries_everything_forward_needs(store):
    c = pending(store)
    t = tunnel_on(store, store.lease("10.0.0.1"))
    assert store.set_tunnel(c.id, t) is None
    got = store.get_contact(c.id).tunnel
    assert got == t and got.security_server == t.security_server and got.offer == t.offer
    assert "keys_digest" not in repr(got)


def test_a_new_tunnel_replaces_the_old_which_stays_leased_until_released(store):
    c = registered_with_tunnel(store)
    old = c.tunnel
    new = tunnel_on(store, store.lease("10.0.0.1"), spi_uc=21, spi_us=22, port_uc=6101)
    assert store.set_tunnel(c.id, new) == old
    assert store.get_contact(c.id).tunnel == new
    assert store.stale_leases(0) == [old]
    assert store.release(old.lease)
    assert store.get_contact(c.id).tunnel == new
    assert store.set_tunnel(c.id, new) is None


def test_delete_contacts_hands_back_its_tunnel_unless_shared(store):
    a = registered_with_tunnel(store)
    b = pending(store, aor="sip:alice2@ims.example")
    store.set_tunnel(b.id, a.tunnel)
    assert store.delete_contacts([a.id]) == []
    assert store.delete_contacts([b.id]) == [a.tunnel]
    assert store.delete_contacts([b.id]) == []
    assert store.stale_leases(0) == [a.tunnel]


def test_expired_lists_registered_after_grace_and_pending_after_lifetime(tmp_path):
    s = make(tmp_path / "ipsec.db", pending_lifetime=10)
    reg = s.set_registered(pending(s, port=5061).id, 1000.0)
    pend = pending(s, port=5062)
    assert s.expired(now=1020.0, grace=30) == []
    assert [c.id for c in s.expired(now=1030.0, grace=30)] == [reg.id]
    later = pend.expires + 0.001
    assert [c.id for c in s.expired(now=later, grace=30)] == [reg.id, pend.id]


def test_a_staged_tunnel_serves_its_phone_until_promoted_and_is_never_stale(store):
    c = registered_with_tunnel(store, port_uc=6100, port_us=6200)
    new = tunnel_on(store, store.lease("10.0.0.1"), "10.0.0.1", spi_uc=21, spi_us=22,
                    port_uc=6300, port_us=6200)
    assert store.stage_tunnel(c.id, new) is None
    staged = store.get_contact(c.id)
    assert staged.tunnel == c.tunnel and staged.pending == new
    assert store.find_by_source("10.0.0.1", 6100).id == c.id  # the old SAs still serve
    assert store.find_by_source("10.0.0.1", 6300).id == c.id  # and the new ones already
    assert sorted(t.lease.spi_pc for t in store.live_tunnels()) == sorted(
        [c.tunnel.lease.spi_pc, new.lease.spi_pc])
    assert store.stale_leases(0) == []
    assert store.promote(c.id) == c.tunnel  # handed back, still leased, for removal
    done = store.get_contact(c.id)
    assert done.tunnel == new and done.pending is None
    assert store.stale_leases(0) == [c.tunnel] and store.promote(c.id) is None


def test_deleting_a_contact_hands_back_its_pending_tunnel_too(store):
    c = registered_with_tunnel(store)
    new = tunnel_on(store, store.lease("10.0.0.1"), "10.0.0.1", spi_uc=21, spi_us=22)
    store.stage_tunnel(c.id, new)
    other = registered_with_tunnel(store, host="10.0.0.7")
    freed = store.delete_contacts([c.id, other.id, 999])
    assert freed == [c.tunnel, new, other.tunnel]
    assert store.release_all(t.lease for t in freed) == 3
    assert store.release_all(t.lease for t in freed) == 0
    assert store.stale_leases(0) == [] and store.live_tunnels() == []


def test_restaging_hands_back_the_previous_pending_tunnel(store):
    c = pending(store)
    first = tunnel_on(store, store.lease("10.0.0.1"), "10.0.0.1")
    second = tunnel_on(store, store.lease("10.0.0.1"), "10.0.0.1", spi_uc=31, spi_us=32)
    assert store.stage_tunnel(c.id, first) is None
    assert store.stage_tunnel(c.id, second) == first
    assert store.get_contact(c.id).pending == second
    store.release(second.lease)  # an install that failed: the contact forgets it
    assert store.get_contact(c.id).pending is None


def test_registering_again_after_the_end_starts_over_as_pending(store):
    c = registered_with_tunnel(store)
    store.set_registered(c.id, time.time() - 5)  # de-registered, teardown still due
    again = pending(store)
    assert again.id == c.id and again.state == "pending" and again.expires > time.time() + 100
    assert store.expired(time.time(), grace=30) == []
    registered_with_tunnel(store, host="10.0.0.9")
    assert pending(store, host="10.0.0.9").state == "registered"  # a live one stays so


def test_a_sweep_never_deletes_a_contact_refreshed_since_it_listed_it(store):
    c = registered_with_tunnel(store)
    store.set_registered(c.id, 1000.0)
    assert [x.id for x in store.expired(now=2000.0, grace=30)] == [c.id]
    store.set_registered(c.id, 5000.0)  # another worker: the 200 OK of a re-registration
    assert store.delete_contacts([c.id], expired_at=(2000.0, 30)) == []
    assert store.get_contact(c.id).tunnel == c.tunnel
    store.set_registered(c.id, 1000.0)
    assert store.delete_contacts([c.id], expired_at=(2000.0, 30)) == [c.tunnel]


def test_live_tunnels_and_reset_when_no_contact_is_left(store):
    c = registered_with_tunnel(store)
    in_flight = store.lease()
    assert store.live_tunnels() == [c.tunnel]
    assert store.stale_leases(60) == []
    assert store.stale_leases(0) == [in_flight]
    assert store.reset_leases_if_empty() == []
    store.delete_contacts([c.id])
    assert store.reset_leases_if_empty() == [c.tunnel, in_flight]
    assert store.live_tunnels() == [] and store.reset_leases_if_empty() == []
    assert store.lease().spi_pc == 1004  # the rotation survives the reset


# -- look-ups ------------------------------------------------------------------------------

def test_find_by_uri_matches_the_contact_uri(store):
    c = registered_with_tunnel(store, uri="sip:alice@10.0.0.1:6200;transport=udp")
    assert store.find_by_uri("sip:alice@10.0.0.1:6200").id == c.id
    assert store.find_by_uri("sip:10.0.0.1:6200;lr").id == c.id
    assert store.find_by_uri("sip:alice@10.0.0.1:6201") is None
    assert store.find_by_uri("sip:alice@10.0.0.2:6200") is None


def test_find_by_uri_matches_a_received_address(store):
    c = registered_with_tunnel(store, port=5070, uri="sip:alice@172.16.0.9:6200")
    assert store.find_by_uri("sip:alice@10.0.0.1:5070").id == c.id


def test_find_by_uri_follows_the_alias_unless_told_not_to(store):
    c = registered_with_tunnel(store, host="203.0.113.7", port=40000,
                               uri="sip:alice@10.1.1.1:6200")
    natted = "sip:alice@10.1.1.1:6200;alias=203.0.113.7~40000~1"
    assert store.find_by_uri(natted).id == c.id
    assert store.find_by_uri("sip:alice@9.9.9.9;alias=203.0.113.7~6200~2").id == c.id
    assert store.find_by_uri("sip:alice@10.1.1.1:6200;alias=203.0.113.8~40000~1") is None
    assert store.find_by_uri("sip:alice@9.9.9.9;alias=203.0.113.7~40000~1",
                             use_alias=False) is None
    # without the alias the URI names 10.1.1.1, where its SAs do not go: only a request
    # for its AoR may take it (test_routing_ownership.py)
    assert store.find_by_uri(natted, use_alias=False) is None
    assert store.find_by_uri(natted, use_alias=False, aor="sip:alice@ims.example").id == c.id


def test_find_by_uri_compares_ipv6_in_any_spelling(store):
    c = registered_with_tunnel(store, host="2001:db8::1", uri="sip:alice@[2001:db8::1]:6200")
    assert store.find_by_uri("sip:alice@[2001:DB8:0::1]:6200").id == c.id
    assert store.find_by_uri("sip:a@x;alias=[2001:db8::1]~5060~1").id == c.id


def test_addresses_of_any_type_and_spelling_match(store):
    class Source:  # what a message object hands over: not our Address, host in brackets
        host, port, proto = "[2001:DB8::5]", 5060, "UDP"

    c = store.save_pending("sip:eve@ims", "sip:eve@[2001:db8::5]", Source(), Source())
    assert c.received == Address("2001:db8::5", 5060, "udp")
    assert store.find_by_received(Source()).id == c.id


def test_find_by_source_matches_only_the_phones_protected_ports(store):
    c = registered_with_tunnel(store, port_uc=6100, port_us=6200)
    assert store.find_by_source("10.0.0.1", 6100).id == c.id
    assert store.find_by_source("10.0.0.1", 6200).id == c.id
    assert store.find_by_source("10.0.0.1", 5060) is None
    assert store.find_by_source("10.0.0.2", 6100) is None


def test_find_by_received_matches_the_unprotected_register_source(store):
    c = pending(store, port=5060, proto="udp")
    assert store.find_by_received(Address("10.0.0.1", 5060, "udp")).id == c.id
    assert store.find_by_received(Address("10.0.0.1", 5060, "tcp")) is None


def test_find_by_aor_received_accepts_aor_or_contact_uri(store):
    c = registered_with_tunnel(store, port=5060)
    assert store.find_by_aor_received("sip:alice@ims.example", "10.0.0.1", 5060).id == c.id
    assert store.find_by_aor_received(c.uri, "10.0.0.1", 5060).id == c.id
    assert store.find_by_aor_received("sip:alice@ims.example", "10.0.0.1", 5061) is None
    assert store.find_by_aor_received("sip:bob@ims.example", "10.0.0.1", 5060) is None


def test_find_by_aor_lists_all_contacts_oldest_first(store):
    a = pending(store, port=5060)
    b = pending(store, port=5070)
    pending(store, aor="sip:bob@ims.example", port=5080)
    assert [c.id for c in store.find_by_aor("sip:alice@ims.example")] == [a.id, b.id]


def test_reverse_search_picks_the_oldest(store):
    older = registered_with_tunnel(store, port=5060, uri="sip:alice@10.0.0.1:6200")
    newer = registered_with_tunnel(store, port=5070, uri="sip:alice@10.0.0.1:6200",
                                   port_uc=6101)
    for find in (lambda **kw: store.find_by_uri("sip:alice@10.0.0.1:6200", **kw),
                 lambda **kw: store.find_by_source("10.0.0.1", 6200, **kw)):
        assert find().id == newer.id
        assert find(newest_first=False).id == older.id


# -- the re-registration decision ----------------------------------------------------------

def test_keep_tunnel_only_with_reuse_same_keys_and_same_phone_side(store):
    current = tunnel_on(store, store.lease())
    same = store.keys_digest(CK, IK)
    assert keep_tunnel(current, current.ue, same, reuse_server_port=True)
    assert not keep_tunnel(current, current.ue, same, reuse_server_port=False)
    assert not keep_tunnel(None, current.ue, same, reuse_server_port=True)
    assert not keep_tunnel(current, current.ue, store.keys_digest(CK, CK), True)
    moved = UeSide("10.0.0.1", 31, 32, 6100, 6200)
    assert not keep_tunnel(current, moved, same, reuse_server_port=True)


def test_workers_leave_the_wal_checkpoint_to_the_sweep(store, tmp_path):
    # a worker's commit would otherwise copy the WAL into the file every 1,000 pages, in the
    # middle of somebody's REGISTER; the sweep's timer calls checkpoint() instead
    store.checkpoint()  # the schema into the file
    store.lease()
    assert store._query("PRAGMA wal_autocheckpoint")[0][0] > 1000

    def tunnels_in_the_file_alone() -> int:
        copy = tmp_path / "file-alone.db"
        copy.write_bytes(open(store.path, "rb").read())  # without its -wal
        db = sqlite3.connect(copy)
        try:
            return db.execute("SELECT count(*) FROM tunnels").fetchone()[0]
        finally:
            db.close()
            copy.unlink()

    assert tunnels_in_the_file_alone() == 0
    store.checkpoint()
    assert tunnels_in_the_file_alone() == 1


def test_renewal_requests_follow_registrations_and_promotions(tmp_path):
    s = make(tmp_path / "ipsec.db")
    c = pending(s)
    assert s.renewals_due(10) == []  # a pending contact's tunnel keeps its pending lifetime
    s.register(c.id, time.time() + 600, uri=c.uri, received=c.received, through=None)
    assert s.renewals_due(10) == [(c.id, 1)]
    s.register(c.id, time.time() + 900, uri=c.uri, received=c.received, through=None)
    assert s.renewals_due(10) == [(c.id, 2)]  # asked again: its seq moved
    s.renewed([(c.id, 1)])  # a sweep that served the first request only
    assert s.renewals_due(10) == [(c.id, 2)]
    s.renewed([(c.id, 2)])
    assert s.renewals_due(10) == []
    s.register(c.id, time.time() + 900, uri=c.uri, received=c.received, through=None)
    s.delete_contacts([c.id])
    assert s.renewals_due(10) == []  # the request goes with its contact


def test_a_promotion_asks_once_and_a_deregistrations_promotion_not_at_all(tmp_path):
    s = make(tmp_path / "ipsec.db")
    c = registered_with_tunnel(s)
    new = tunnel_on(s, s.lease("10.0.0.1"), spi_uc=21, spi_us=22, port_uc=7100, port_us=7200)
    s.stage_tunnel(c.id, new)
    s.register(c.id, time.time() + 600, uri=c.uri, received=c.received,
               through=new.lease.spi_pc)
    assert s.renewals_due(10) == [(c.id, 1)]  # one request for the 200 OK and its promotion
    s.renewed([(c.id, 1)])
    newer = tunnel_on(s, s.lease("10.0.0.1"), spi_uc=31, spi_us=32, port_uc=8100, port_us=8200)
    s.stage_tunnel(c.id, newer)
    assert s.promote(c.id, newer.lease.spi_pc) is not None  # a de-registration's (expires=0)
    assert s.renewals_due(10) == []  # its tunnels go: nothing to renew
