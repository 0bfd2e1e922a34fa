"""Shedding unprotected REGISTERs while TM is overloaded (kemi/overload.py), over the KSR double.

The double cannot count TM's transactions across messages: each test sets what tmx's
`active_transactions` reads (KSR._tm_stats); the e2e flood test reads the real one.
"""
from __future__ import annotations

import pytest

import KSR
from ipsec import counters as stat
from ipsec.counters import Tally
from ipsec.params import ParamError
from kemi.overload import (DEFAULT, QUIET, Overload, Senders, Shed, limit_from_defines,
                            must_shed)
from scenario import CORE, PCSCF, PORT_UC, UE, Pcscf, register, request, server_param

LIMIT = 50
NEW = "10.0.0.77"  # a new phone's address


@pytest.fixture
def busy(tmp_path):
    p = Pcscf.start(str(tmp_path / "ipsec.sqlite"), OVERLOAD_TRANSACTIONS=str(LIMIT))
    p.module.counters = Tally()
    yield p
    p.module.store.close()


def _retry_after(rec) -> int:
    (reply,) = rec.replies
    (value,) = [v for n, v in reply.headers if n == "Retry-After"]
    return int(value)


def _busy_host(p, n: int = QUIET) -> None:
    """`n` unprotected REGISTERs from UE while TM is not busy: all let in."""
    KSR._tm_stats(active_transactions=0)
    for _ in range(n):
        assert p.request(register()).relays


def test_a_busy_host_is_dropped_at_the_limit_before_any_work(busy):
    _busy_host(busy)
    KSR._tm_stats(active_transactions=LIMIT)
    rec = busy.request(register())
    assert rec.replies == [] and rec.relays == [] and rec.transaction is None
    assert busy.module.store.find_by_aor("sip:alice@ims.example") == []
    assert busy.module.counters[stat.REGISTERS_SHED] == 1
    assert (f"overloaded: REGISTER from {UE} dropped ({LIMIT} active transactions "
            f"(OVERLOAD_TRANSACTIONS={LIMIT}) and its host sent {QUIET + 1} lately)"
            in rec.log_text())


def test_a_quiet_host_gets_in_up_to_twice_the_limit_then_503(busy):
    """A new phone is not shed with the flood's hosts; from twice the limit, it is told to
    come back later."""
    _busy_host(busy)
    KSR._tm_stats(active_transactions=2 * LIMIT - 1)
    quiet = (NEW, 5060, "udp")
    rec = busy.request(register(via=f"{NEW}:5060"), source=quiet)
    assert rec.replies == [] and len(rec.relays) == 1
    rec = busy.request(register())  # the busy one
    assert rec.replies == [] and rec.relays == []
    KSR._tm_stats(active_transactions=2 * LIMIT)
    rec = busy.request(register(via=f"{NEW}:5060"), source=quiet)
    assert [(r.code, r.stateful) for r in rec.replies] == [(503, False)]
    assert 1 <= _retry_after(rec) <= 5
    assert rec.relays == [] and rec.transaction is None
    assert busy.module.counters[stat.REGISTERS_SHED] == 2


@pytest.mark.parametrize("active, recent, why", [
    (None, 99, None), (LIMIT - 1, 99, None), (LIMIT, QUIET, None),
    (LIMIT, QUIET + 1, Shed(f"{LIMIT} active transactions (OVERLOAD_TRANSACTIONS={LIMIT}) and "
                            f"its host sent {QUIET + 1} lately", answer=False)),
    (2 * LIMIT - 1, 1, None),
    (2 * LIMIT, 1, Shed(f"{2 * LIMIT} active transactions, twice OVERLOAD_TRANSACTIONS={LIMIT}",
                        answer=True)),
    (2 * LIMIT, QUIET + 1, Shed(f"{2 * LIMIT} active transactions (OVERLOAD_TRANSACTIONS="
                                f"{LIMIT}) and its host sent {QUIET + 1} lately", answer=False))])
def test_must_shed(active, recent, why):
    assert must_shed(active, LIMIT, recent) == why
    assert must_shed(active, 0, recent) is None  # 0: off


def test_a_copy_of_a_register_let_in_is_left_to_its_transaction_not_shed(busy):
    """TM absorbs it (t_check_trans answers 0 and resends the last reply): a 503 here would
    end, for the phone, a registration that is on its way."""
    KSR._tm_stats(active_transactions=2 * LIMIT)
    rec = busy.request(register(), retransmission=True)
    assert rec.replies == [] and rec.relays == []
    assert busy.module.counters[stat.REGISTERS_SHED] == 0


def test_below_the_limit_even_a_busy_host_goes_on(busy):
    _busy_host(busy, 10)
    KSR._tm_stats(active_transactions=LIMIT - 1)
    rec = busy.request(register())
    assert rec.replies == [] and len(rec.relays) == 1
    assert busy.module.counters[stat.REGISTERS_SHED] == 0


def test_a_registered_phone_keeps_its_service_while_new_registers_are_shed(busy):
    """Re-keys and requests through the SAs, and the core's requests, are never shed."""
    server = busy.registered()
    KSR._tm_stats(active_transactions=10 * LIMIT)
    rekey = register(security_verify=server, via=f"{UE}:{PORT_UC}", cseq=3)
    port_ps = int(server_param(server, "port-s"))
    rec = busy.request(rekey, source=(UE, PORT_UC, "udp"), local=(PCSCF, port_ps))
    assert rec.replies == [] and len(rec.relays) == 1
    mo = request("MESSAGE", "sip:bob@ims.example", via=f"{UE}:{PORT_UC}",
                 extra=(f"Security-Verify: {server}", "Require: sec-agree"))
    rec = busy.request(mo, source=(UE, PORT_UC, "udp"), local=(PCSCF, port_ps))
    assert rec.replies == [] and len(rec.relays) == 1
    mt = request("MESSAGE", f"sip:alice@{UE}:5060", via=f"{CORE}:5060")
    rec = busy.request(mt, source=(CORE, 5060, "udp"))
    assert rec.replies == [] and len(rec.relays) == 1
    assert busy.module.counters[stat.REGISTERS_SHED] == 0


def test_one_log_line_a_second_per_worker_however_many_are_shed(busy):
    now = [100.0]
    busy.routing.overload.clock = lambda: now[0]
    KSR._tm_stats(active_transactions=2 * LIMIT)
    lines = []
    for step in range(30):  # 30 REGISTERs over 1.5 s
        now[0] = 100.0 + step * 0.05
        lines += [line for line in busy.request(register()).logs["warn"] if "overloaded" in line]
    assert len(lines) == 2 and "1 unprotected REGISTER(s)" in lines[0]
    assert "20 unprotected REGISTER(s)" in lines[1]  # the ones since the first line
    assert busy.module.counters[stat.REGISTERS_SHED] == 30


def test_senders_count_two_windows_and_forget_older_ones():
    s = Senders(window=1.0)
    assert [s.note("a", t) for t in (0.0, 0.2, 0.9)] == [1, 2, 3]
    assert s.note("a", 1.1) == 4  # this window's 1 + the last one's 3
    assert s.note("b", 1.2) == 1
    assert s.note("a", 2.2) == 2  # the window of 0.0 is forgotten
    assert s.note("a", 5.0) == 1  # after a quiet gap, nothing is remembered
    assert s.note("b", 5.1) == 1


def test_zero_turns_shedding_off(tmp_path):
    p = Pcscf.start(str(tmp_path / "ipsec.sqlite"), OVERLOAD_TRANSACTIONS="0")
    _busy_host(p, 10)
    KSR._tm_stats(active_transactions=10**6)
    rec = p.request(register())
    assert rec.replies == [] and len(rec.relays) == 1
    p.module.store.close()


def test_without_tms_figure_nothing_is_shed(busy, monkeypatch):
    """tmx not loaded ($stat answers nothing): never shed on a figure we do not have."""
    _busy_host(busy)
    monkeypatch.setattr(KSR, "_stat", lambda name: None)
    rec = busy.request(register())
    assert rec.replies == [] and len(rec.relays) == 1


@pytest.mark.parametrize("raw, want", [("", DEFAULT), ("0", 0), ("200", 200), ('"64"', 64)])
def test_the_define(raw, want):
    assert limit_from_defines({"OVERLOAD_TRANSACTIONS": raw}.get) == want
    assert Overload.from_defines(lambda name: raw or None).limit == want


@pytest.mark.parametrize("raw", ["-1", "lots", "10000001"])
def test_a_bad_define_names_itself(raw):
    with pytest.raises(ParamError, match="OVERLOAD_TRANSACTIONS"):
        limit_from_defines({"OVERLOAD_TRANSACTIONS": raw}.get)
