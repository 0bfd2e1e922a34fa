"""Overload shedding (kemi/overload.py) on real Kamailio, step by step: TM's real count of
active transactions, made by REGISTERs the S-CSCF stub leaves unanswered (a slow HSS), with
OVERLOAD_TRANSACTIONS=1 (TM's figure, as tmx gives it, is up to 2 s old in each worker: the
test waits that long before counting on it; the S-CSCF's fr_timer of 8 s bounds the rest).

- two new phones get in (0, then 1 active transaction: a quiet host, under twice the limit);
- at 2 (twice the limit) a third is answered 503 with Retry-After, statelessly: no 401, no row;
- a registered phone's request through its SAs still goes through;
- a busy host (30 REGISTERs at once) is shed whole: the first few a worker reads are answered
  503, the rest dropped without an answer, and `ipsec_registers_shed` counts them all.
The flood test shows the same under a flood; this one shows each branch on its own.
"""
from __future__ import annotations

import select
import socket
import sqlite3
import time

import pytest

from esp_net import run
from pcscf_net import Kamailio, Phone, _socket
from sip import parse, stranger_register, token

BUSY_HOST = "10.77.0.130"
BURST = 30
TMX_REFRESH = 2.5  # tmx caches its figures in each process for 2 s (tmx_stats_update)


@pytest.fixture(scope="module")
def kamailio(link, scscf, tmp_path_factory):
    run("ip", "-n", link.ue, "addr", "add", f"{BUSY_HOST}/24", "dev", link.ue_dev)
    k = Kamailio(link, tmp_path_factory.mktemp("kamailio-overload"), OVERLOAD_TRANSACTIONS="1")
    k.start()
    yield k
    k.stop_and_check()  # the state invariant, then Python errors


def _contacts(k: Kamailio, aor: str) -> int:
    db = sqlite3.connect(f"file:{k.store_path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT count(*) FROM contacts WHERE aor = ?", (aor,)).fetchone()[0]
    finally:
        db.close()


def _register(n: int) -> bytes:
    return stranger_register(f"busy{n}", BUSY_HOST, 5060,
                             "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;spi-c=7001;"
                             f"spi-s=7002;port-c={20000 + n};port-s={30000 + n}")


def test_each_branch_of_the_shedding(link, scscf, kamailio):
    registered = Phone(link, scscf, user="steady")
    registered.full_registration()
    shed_before = kamailio.statistic("ipsec_registers_shed")
    held = [Phone(link, scscf, user=f"held{i}") for i in range(2)]
    for phone in held:  # each let in: 0, then 1 active transaction (quiet host, < 2 x 1)
        scscf.hold.add(phone.aor)
        phone.register(protected=False)
        deadline = time.monotonic() + 5
        while not any(m.is_request and m.method == "REGISTER" and m.get("To") == f"<{phone.aor}>"
                      for m in list(scscf.seen)):
            assert time.monotonic() < deadline, f"{phone.user}'s REGISTER was not relayed"
            time.sleep(0.05)
    assert kamailio.statistic("ipsec_registers_shed") == shed_before

    # tmx refreshes a worker's figure when it is 2 s old or more: wait for every worker's
    time.sleep(TMX_REFRESH)
    third = Phone(link, scscf, user="third")
    third.register(protected=False)
    cseq = f"{third.cseq} REGISTER"
    answer, _, _ = third.wait(lambda m: not m.is_request and m.get("CSeq") == cseq,
                              "an answer to REGISTER", 5)
    assert answer.status == 503, answer.text()
    assert 1 <= int(answer.get("Retry-After")) <= 5, answer.text()
    assert not any(m.is_request and m.get("To") == f"<{third.aor}>" for m in scscf.seen)
    assert _contacts(kamailio, third.aor) == 0
    assert kamailio.statistic("ipsec_registers_shed") == shed_before + 1

    s = _socket(link.ue, 4, socket.SOCK_DGRAM)
    try:
        s.bind((BUSY_HOST, 5060))
        for n in range(BURST):
            s.sendto(_register(n), (registered.pcscf, 5060))
        answered, deadline = 0, time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                r = parse(s.recv(65535))
                assert r.status == 503, r.text()
                answered += 1
    finally:
        s.close()
    # through its SAs a registered phone is never shed
    registered.request("MESSAGE", "sip:bob@ims.test", call_id=token(), to="<sip:bob@ims.test>")
    registered.wait_reply(200, "MESSAGE")
    shed = kamailio.statistic("ipsec_registers_shed") - shed_before - 1
    print(f"\nbusy host: {BURST} REGISTERs, {answered} answered 503, {shed} shed in all")
    assert shed == BURST  # every one of them, none relayed
    assert 0 < answered < BURST  # the first few a worker reads: 503; the rest dropped
    # a worker logs its first shedding (at most one line a second): the third phone's
    assert "answered 503 (2 active transactions, twice OVERLOAD_TRANSACTIONS=1)" in kamailio.log()
    assert not any(m.is_request and "busy" in (m.get("To") or "") for m in scscf.seen)
