"""A full disk under the store, on a real file system and a real kernel (issue 11 item 3).

The store lives on a tmpfs of 1 MB mounted for the test; a filler file takes every free block.
SQLite then cannot grow its write-ahead log: the challenge's transaction fails with
SQLITE_FULL. The phone must get the routing's 503 and no Security-Server, the kernel must hold
nothing of ours (the store is written before the SAs go in), the store must hold no row of
the failed challenge, and once space is back the next challenge works. The WAL is truncated
first (as `PRAGMA wal_checkpoint(TRUNCATE)` or a fresh start leaves it): a WAL that has
already grown reuses its own blocks and needs no new space, which is why a full disk can go
unnoticed by a running P-CSCF until its log or database must grow.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from test_module_kernel import first_401, start, xfrm  # noqa: F401, I001  (sys.path first; xfrm: the fixture)

import KSR  # noqa: E402
from ipsec.tunnel import MARKER  # noqa: E402


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(where: Path) -> Path:
    """Take every free block of the file system `where` is on."""
    filler = where / "filler"
    chunk = bytes(4096)
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    return filler


def rows(p, table: str) -> int:
    return p.module.store._db().execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_a_full_disk_refuses_the_challenge_whole_and_the_next_one_works(small_disk, xfrm):  # noqa: F811
    p = start(small_disk, xfrm)
    db = p.module.store._db()
    assert rows(p, "tunnels") == 0
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    assert os.path.getsize(small_disk / "ipsec.sqlite-wal") == 0
    filler = fill(small_disk)

    assert first_401(p) == (503, None)
    assert "full" in KSR._rec.log_text()
    assert xfrm.states(user=MARKER) == [] and xfrm.policies(user=MARKER) == []
    assert rows(p, "tunnels") == 0 and rows(p, "contacts") == 0
    assert p.module.sweep() in (1, -1)  # the timer's sweep logs, never raises into Kamailio

    filler.unlink()
    status, server = first_401(p)
    assert status == 401 and server is not None, KSR._rec.log_text()
    assert len(xfrm.states(user=MARKER)) == 4 and len(xfrm.policies(user=MARKER)) == 4
    assert rows(p, "tunnels") == 1 and rows(p, "contacts") == 1
