"""One batch, one answer per request, against the real kernel: only a datagram's last message
asks for an ACK (ipsec/xfrm/client.py), so refusals in the middle, at the end, and GETs that
find something or nothing must still land on the right request, and nothing may be left
unread for the next batch."""
from __future__ import annotations

import errno

import pytest

from esp_net import CK, IK, flush_ns, tunnel_for
from ipsec.algorithms import esp_algs
from ipsec.tunnel import sas
from ipsec.xfrm import SAId, SAInfo, XfrmExists, XfrmNotFound, del_sa, new_sa
from ipsec.xfrm import mrecv
from ipsec.xfrm.client import MAX_BATCH_MESSAGES


@pytest.fixture(autouse=True)
def clean(link):
    yield
    flush_ns(link.pc)


def _sas(i: int):
    t = tunnel_for(4000 + i, 4)
    return sas(t, esp_algs(t.alg, t.ealg, CK, IK))


@pytest.mark.parametrize("refused", [[0], [3], [7], [2, 6], [0, 5, 7]])
def test_each_refusal_lands_on_its_request(x, refused):
    """Requests 0-3 add SAs, 4-7 delete the 4 held ones; the positions in `refused` are made
    to fail (an add of an SA that exists, a delete of one that does not)."""
    held, new = _sas(1), _sas(2)
    assert x.batch([new_sa(s) for s in held]) == [None] * 4
    requests = [new_sa(s) for s in new] + [del_sa(SAId(s.dst, s.spi)) for s in held]
    for i in refused:
        requests[i] = (new_sa(held[i]) if i < 4
                       else del_sa(SAId(new[0].dst, 0x7FFF0000 + i)))
    results = x.batch(requests)
    assert [i for i, r in enumerate(results) if r is not None] == refused
    for i in refused:
        assert isinstance(results[i], XfrmExists if i < 4 else XfrmNotFound), results[i]
    # the next batch's answers are its own: the SAs added are there, the refused ones not
    added = [s for i, s in enumerate(new) if i not in refused]
    assert x.batch([del_sa(SAId(s.dst, s.spi)) for s in added]) == [None] * len(added)


def test_gets_answer_found_and_missing_in_order(x):
    held = _sas(3)
    assert x.batch([new_sa(s) for s in held]) == [None] * 4
    ids = [SAId(held[0].dst, held[0].spi), SAId(held[1].dst, 0x7FFF1234),
           SAId(held[2].dst, held[2].spi), SAId(held[3].dst, 0x7FFF4321)]
    found = x.get_states(ids)
    assert isinstance(found[0], SAInfo) and found[0].spi == held[0].spi
    assert isinstance(found[1], XfrmNotFound) and found[1].errno in (errno.ESRCH, errno.ENOENT)
    assert isinstance(found[2], SAInfo) and found[2].spi == held[2].spi
    assert isinstance(found[3], XfrmNotFound)
    # a GET last in its datagram (the one that carries the ACK flag), found and not
    assert isinstance(x.get_states([ids[0]])[0], SAInfo)
    assert isinstance(x.get_states([ids[1]])[0], XfrmNotFound)


def test_more_requests_than_one_datagram_holds(x):
    many = [s for i in range(MAX_BATCH_MESSAGES // 4 + 3) for s in _sas(10 + i)]
    assert len(many) > MAX_BATCH_MESSAGES
    assert x.batch([new_sa(s) for s in many]) == [None] * len(many)
    again = x.batch([new_sa(s) for s in many])
    assert all(isinstance(r, XfrmExists) for r in again)
    assert x.batch([del_sa(SAId(s.dst, s.spi)) for s in many]) == [None] * len(many)


def test_a_look_up_batch_reads_its_answers_in_a_few_system_calls(x, monkeypatch):
    """Each GET is answered in a datagram of its own; recvmmsg takes those queued together
    (ipsec/xfrm/mrecv.py), where recv took one system call per entry (~55 us each in UML).
    The answers stay exact: every SA found, in order, the missing one missing."""
    held = [s for i in range(12) for s in _sas(40 + i)]  # 48 SAs, one datagram of GETs
    assert x.batch([new_sa(s) for s in held]) == [None] * len(held)
    calls = []
    real = mrecv._recvmmsg
    monkeypatch.setattr(mrecv, "_recvmmsg", lambda *a: calls.append(1) or real(*a))
    ids = [SAId(s.dst, s.spi) for s in held] + [SAId(held[0].dst, 0x7FFF0001)]
    found = x.get_states(ids)
    assert [f.spi for f in found[:-1]] == [s.spi for s in held]
    assert isinstance(found[-1], XfrmNotFound)
    assert 1 <= len(calls) <= 3, f"{len(calls)} recvmmsg calls for {len(ids)} answers"
    assert x.batch([del_sa(i) for i in ids[:-1]]) == [None] * len(held)
