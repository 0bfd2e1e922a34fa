"""Refusals from the kernel and failures of the store in the middle of `ipsec_create`: the
phone gets no keys (the 401 loses them, the routing answers 503), nothing is left half
installed, and once the fault is gone the next challenge works (issue 11 item 3)."""
from __future__ import annotations

import errno
import sqlite3

import pytest

import KSR
from ipsec.xfrm import Request
from ipsec.xfrm import structs as k
from test_module import assert_no_keys_logged, assert_nothing_left, create, pending

KERNEL_ERRORS = [errno.ENOMEM, errno.ENOBUFS, errno.EPERM, errno.EEXIST]


@pytest.mark.parametrize("what", [k.XFRM_MSG_NEWSA, k.XFRM_MSG_NEWPOLICY], ids=["sa", "policy"])
@pytest.mark.parametrize("err", KERNEL_ERRORS, ids=[errno.errorcode[e] for e in KERNEL_ERRORS])
def test_a_kernel_refusal_leaves_nothing_and_the_next_challenge_works(pcscf, err, what):
    seen = []

    def refuse(r: Request) -> int | None:
        if r.type == what:
            seen.append(r)
            # the third add of that kind: some of the tunnel is in when it fails
            return err if len(seen) == 3 else None
        return None

    pcscf.kernel.refuse = refuse
    reg = pending(pcscf)
    assert create(pcscf, reg) == -1
    assert errno.errorcode[err] in "".join(KSR._rec.logs["err"])
    assert KSR._rec.values("Security-Server") == []  # no challenge goes out unprotected
    assert_nothing_left(pcscf)
    assert_no_keys_logged()

    pcscf.kernel.refuse = lambda r: None
    assert create(pcscf, pending(pcscf)) == 1
    assert len(pcscf.kernel.sas) == 4 and len(pcscf.kernel.policies_by_id) == 4


def _read_only(pcscf) -> None:
    pcscf.module.store._db().execute("PRAGMA query_only = ON")


def _writable(pcscf) -> None:
    pcscf.module.store._db().execute("PRAGMA query_only = OFF")


def test_a_read_only_store_refuses_the_challenge_whole_and_recovers(pcscf):
    reg = pending(pcscf)
    _read_only(pcscf)
    assert create(pcscf, reg) == -1
    assert "readonly" in "".join(KSR._rec.logs["err"]).replace("-", "").replace(" ", "")
    assert KSR._rec.values("Security-Server") == []
    assert pcscf.kernel.sas == {} and pcscf.kernel.policies_by_id == {}
    _writable(pcscf)
    assert create(pcscf, pending(pcscf)) == 1


def test_a_store_locked_past_its_timeout_refuses_the_challenge_and_recovers(pcscf):
    store = pcscf.module.store
    reg = pending(pcscf)
    store.close()
    store.busy_timeout = 0.2
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # an operator's tool holding the write lock
    try:
        assert create(pcscf, reg) == -1
        assert "locked" in "".join(KSR._rec.logs["err"])
        assert KSR._rec.values("Security-Server") == []
        assert pcscf.kernel.sas == {} and pcscf.kernel.policies_by_id == {}
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert create(pcscf, pending(pcscf)) == 1
