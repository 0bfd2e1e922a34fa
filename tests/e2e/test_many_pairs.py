"""Many port pairs must not collapse the P-CSCF (issue 9 item 4), on real Kamailio.

Each port pair is 2 protected UDP sockets per address family, and Kamailio gives each UDP
socket worker processes of its own; they start one after the other from the main process,
which keeps one open file per socket and per process. So: the protected sockets have
IPSEC_CHILDREN workers each (port 5060 keeps CHILDREN), a phone registers as soon as they all
answer, the open files are had before the fork instead of failing part-way, and pair counts
beyond the limit are refused at start with the reason and the advice.
"""
from __future__ import annotations

import time

import pytest

import esp_net
from pcscf_net import Kamailio, Phone

PAIRS = 20  # 40 ports, IPv4 and IPv6: 80 protected UDP sockets
OTHERS = 10  # main, TCP main and its 2 workers, timers, rtimer (8 today) and some room


def _kamailio(link, tmp_path, **defines) -> Kamailio:
    esp_net.flush_ns(link.ue)  # an earlier phone's SAs: a new store hands out the same SPIs
    return Kamailio(link, tmp_path, IPSEC_MAX_CONNECTIONS=str(PAIRS), IPSEC_CLIENT_PORT="5100",
                    IPSEC_SERVER_PORT="5200", **defines)


def _exited(k: Kamailio, prefix: tuple[str, ...] = ()) -> str:
    with pytest.raises(AssertionError, match="kamailio exited"):
        k.start(prefix)
    deadline = time.monotonic() + 10
    while k.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert k.proc.returncode not in (None, 0)
    k.stop()
    return k.log()


def test_protected_sockets_have_ipsec_children_workers_and_a_phone_registers_at_once(
        link, scscf, tmp_path):
    k = _kamailio(link, tmp_path)  # CHILDREN=2 (the rig's), IPSEC_CHILDREN=1 (kamailio.cfg's)
    try:
        took = k.start()  # every protected socket answered OPTIONS
        sockets = len(k.protected_sockets())
        assert sockets == 2 * PAIRS * 2
        processes = len(k.processes())
        # every socket needs one; before IPSEC_CHILDREN each had CHILDREN: 2 * 80 + 4 + 8 = 172
        assert sockets + 2 * 2 <= processes <= sockets * 1 + 2 * 2 + OTHERS, processes
        phone = Phone(link, scscf, user="early")
        phone.full_registration()
        phone.close()
        assert took < 60, f"{PAIRS} port pairs took {took:.1f} s to start"
        deadline = time.monotonic() + 10  # rtimer's first sweep, forked after the UDP workers
        while "ims-ipsec: started: every UDP worker is up" not in k.log():
            assert time.monotonic() < deadline, "no start-up line from the first sweep"
            time.sleep(0.2)
    finally:
        k.stop()


def test_open_files_are_raised_before_the_fork_instead_of_failing_part_way(link, scscf, tmp_path):
    # 80 protected + 2 port 5060 sockets, UDP and TCP, and ~92 processes: more than 200 open
    # files in the main process; with the soft limit at 200 Kamailio used to die forking
    k = _kamailio(link, tmp_path)
    try:
        k.start(prefix=("prlimit", "--nofile=200:4096"))
        assert "ims-ipsec: open files limit raised from 200 to" in k.log()
        phone = Phone(link, scscf, user="raised")
        phone.full_registration()
        phone.close()
    finally:
        k.stop()
    assert "Cannot fork" not in k.log()


def test_open_files_out_of_reach_stop_kamailio_with_the_numbers_and_the_advice(link, tmp_path):
    log = _exited(_kamailio(link, tmp_path), prefix=("prlimit", "--nofile=200:200"))
    assert "refusing to start: open files: 80 protected and 2 port 5060 UDP sockets" in log
    assert "the limit is 200 (hard 200)" in log and "LimitNOFILE=" in log
    assert "Cannot fork" not in log


def test_too_many_port_pairs_stop_kamailio_with_the_reason_and_the_advice(link, tmp_path):
    k = Kamailio(link, tmp_path, IPSEC_MAX_CONNECTIONS="208", IPSEC_CLIENT_PORT="5100",
                 IPSEC_SERVER_PORT="5400")
    log = _exited(k)
    assert ("refusing to start: ipsec_max_connections: 208 port pairs is more than 100; "
            "it is not the number of phones") in log
    assert "a few suffice" in log and "would start 832 processes or more" in log
