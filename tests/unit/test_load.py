"""The load generator's own logic (tools/load), on the host: the phone's keys against the
e2e phone's 33.203 table, its SAs against the P-CSCF's flows, the SIP helpers, the S-CSCF
stub over real UDP sockets, and the statistics."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))

import esp_net  # noqa: E402
from ipsec import tunnel as pcscf_tunnel  # noqa: E402
from ipsec.algorithms import VALID_PAIRS  # noqa: E402
from ipsec.xfrm import Dir  # noqa: E402
from ipsec.xfrm import structs as k  # noqa: E402
from tools.load import sip  # noqa: E402
from tools.load.engine import PhaseResult  # noqa: E402
from tools.load.report import Report  # noqa: E402
from tools.load.scenario import busiest, process_stat  # noqa: E402
from tools.load.scscf import Scscf  # noqa: E402
from tools.load.spy import calls_per_step  # noqa: E402
from tools.load.ue_ipsec import UeTunnel, aka, drop_requests, flows, install_requests, ue_algs  # noqa: E402

CK, IK = esp_net.CK, esp_net.IK


def _tunnel(alg: str = "hmac-sha-1-96", ealg: str = "aes-cbc") -> UeTunnel:
    return UeTunnel("10.90.0.1", "10.90.1.1", 5100, 5300, 10002, 10001, 4096, 4097,
                    0x10000000, 0x10000001, alg, ealg, CK, IK)


def _ip_algs_parsed(alg: str, ealg: str) -> list[tuple[str, bytes, int]]:
    """(name, key, icv bits) of each algorithm in esp_net.ip_algs' `ip xfrm` text (keys CK, IK)."""
    t = esp_net.tunnel_for(0, 4, alg, ealg)
    out = []
    for kind, name, key, bits in re.findall(r"(auth-trunc|enc|aead) '([^']+)' (0x[0-9a-f]+|'')(?: (\d+))?",
                                            esp_net.ip_algs(t)):
        out.append((name, b"" if key == "''" else bytes.fromhex(key[2:]), int(bits or 0)))
    return out


@pytest.mark.parametrize("alg,ealg", sorted(VALID_PAIRS))
def test_phone_keys_follow_the_e2e_phones_annex_i_table(alg, ealg):
    a = ue_algs(alg, ealg, CK, IK)
    ours = [(x.name, x.key, x.icv_bits) for x in (a.aead, a.auth, a.crypt) if x is not None]
    assert ours == _ip_algs_parsed(alg, ealg)


def test_aka_is_a_function_of_user_and_nonce():
    ck, ik, res = aka("sip:u1@ims.test", b"n1")
    assert (ck, ik, res) == aka("sip:u1@ims.test", b"n1")
    assert len(ck) == len(ik) == 16 and re.fullmatch(r"[0-9a-f]{32}", res)
    assert aka("sip:u1@ims.test", b"n2")[:2] != (ck, ik)
    assert aka("sip:u2@ims.test", b"n1")[:2] != (ck, ik)


def test_phone_policies_mirror_the_pcscf_ones():
    """Same selectors as the P-CSCF's tunnel, every direction swapped, reqid = SPI."""
    t = _tunnel()
    pt = pcscf_tunnel.Tunnel(t.pcscf, t.ue, t.port_pc, t.port_ps, t.port_uc, t.port_us,
                             t.spi_pc, t.spi_ps, t.spi_uc, t.spi_us, t.alg, t.ealg, CK, IK)
    theirs = {(p.sel.src, p.sel.sport, p.sel.dst, p.sel.dport): (p.dir, p.tmpl.reqid)
              for p in pcscf_tunnel.policies(pt)}
    swap = {Dir.IN: Dir.OUT, Dir.OUT: Dir.IN}
    ours = {(src, sport, dst, dport): (swap[d], spi) for src, sport, dst, dport, spi, d in flows(t)}
    assert ours == theirs


def test_install_puts_sas_before_policies_and_drop_the_reverse():
    t = _tunnel()
    inst = install_requests(t)
    assert [r.type for r in inst] == [k.XFRM_MSG_NEWSA] * 4 + [k.XFRM_MSG_NEWPOLICY] * 4
    assert [r.what.reqid for r in inst[:4]] == [r.what.spi for r in inst[:4]]
    assert {r.what.spi for r in inst[:4]} == {t.spi_pc, t.spi_ps, t.spi_uc, t.spi_us}
    drop = drop_requests(t)
    assert [r.type for r in drop] == [k.XFRM_MSG_DELPOLICY] * 4 + [k.XFRM_MSG_DELSA] * 4
    assert [r.what.sel for r in drop[:4]] == [r.what.sel for r in inst[4:]]


REQ = (b"REGISTER sip:ims.test SIP/2.0\r\n"
       b"Via: SIP/2.0/UDP 10.90.0.1:5300;branch=z9hG4bKk\r\n"
       b"Via: SIP/2.0/UDP 10.90.1.1:10001;branch=z9hG4bKp;rport=10000\r\n"
       b"From: <sip:u0@ims.test>;tag=p0\r\n"
       b"To: <sip:u0@ims.test>\r\n"
       b"Call-ID: c1\r\n"
       b"CSeq: 2 REGISTER\r\n"
       b"Contact: <sip:u0@10.90.1.1:10001>;expires=3600\r\n"
       b"Path: <sip:10.90.0.1;lr>\r\n"
       b'Authorization: Digest username="u0@ims.test", nonce="%s", response="%s"\r\n'
       b"Content-Length: 0\r\n\r\n")


def test_reply_copies_the_transaction_headers_in_order_and_tags_to():
    r = sip.reply(REQ % (b"", b""), b"401 Unauthorized", b"t1", b"X: y\r\n")
    assert r.split(b"\r\n")[:8] == [
        b"SIP/2.0 401 Unauthorized", b"Via: SIP/2.0/UDP 10.90.0.1:5300;branch=z9hG4bKk",
        b"Via: SIP/2.0/UDP 10.90.1.1:10001;branch=z9hG4bKp;rport=10000",
        b"From: <sip:u0@ims.test>;tag=p0", b"To: <sip:u0@ims.test>;tag=t1", b"Call-ID: c1",
        b"CSeq: 2 REGISTER", b"X: y"]
    assert r.endswith(b"Content-Length: 0\r\n\r\n")
    assert sip.cseq(r) == (2, b"REGISTER") and sip.status_of(r) == 401
    assert sip.top_via(REQ) == ("10.90.0.1", 5300)


def test_helpers_read_security_server_and_spot_keys():
    value = b"ipsec-3gpp;q=0.1;prot=esp;spi-c=4096;spi-s=4097;port-c=5100;port-s=5300;alg=hmac-md5-96"
    assert sip.params(value)["spi-s"] == "4097" and sip.params(value)["alg"] == "hmac-md5-96"
    assert sip.KEYS.search(b'nonce="x", CK = "00"') and sip.KEYS.search(b', ik="11"')
    assert not sip.KEYS.search(b'WWW-Authenticate: Digest nonce="ck", quick=1')


@pytest.fixture
def stub():
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.bind(("127.0.0.1", 0))
    b.settimeout(2)
    yield Scscf(a, ("127.0.0.1", 5060)), b
    a.close()
    b.close()


def _ask(stub_and_peer, data: bytes) -> bytes:
    s, peer = stub_and_peer
    peer.sendto(data, s.addr)
    got, addr = s.sock.recvfrom(65535)
    s.on_datagram(0, got, addr)
    return peer.recv(65535)


def test_stub_challenges_with_the_keys_of_its_nonce_then_registers(stub):
    r401 = _ask(stub, REQ % (b"", b""))
    assert sip.status_of(r401) == 401
    nonce = sip.first(sip.NONCE, r401)
    ck, ik, res = aka("sip:u0@ims.test", nonce)
    assert f'ck="{ck.hex()}", ik="{ik.hex()}"'.encode() in r401
    r200 = _ask(stub, REQ % (nonce, res.encode()))
    assert sip.status_of(r200) == 200
    assert b"\r\nContact: <sip:u0@10.90.1.1:10001>;expires=3600\r\n" in r200
    assert b"\r\nPath: <sip:10.90.0.1;lr>\r\n" in r200
    assert stub[0].paths[b"sip:u0@ims.test"] == b"sip:10.90.0.1;lr"


def test_stub_refuses_a_response_that_is_not_its_nonces(stub):
    assert sip.status_of(_ask(stub, REQ % (b"abc", b"0" * 32))) == 403


def test_stub_mt_message_follows_path_to_the_contact_and_hands_over_its_answer(stub):
    s, _ = stub
    assert s.mt_message(b"sip:u0@ims.test", lambda *_: None) is None  # never registered
    r401 = _ask(stub, REQ % (b"", b""))
    nonce = sip.first(sip.NONCE, r401)
    _ask(stub, REQ % (nonce, aka("sip:u0@ims.test", nonce)[2].encode()))
    got = []
    mt = s.mt_message(b"sip:u0@ims.test", lambda status, data: got.append(status))
    assert mt.startswith(b"MESSAGE sip:u0@10.90.1.1:10001 SIP/2.0\r\n")
    assert b"\r\nRoute: <sip:10.90.0.1;lr>\r\n" in mt
    s.on_datagram(0, sip.reply(mt, b"200 OK", b"x"), ("127.0.0.1", 5060))
    s.on_datagram(0, sip.reply(mt, b"200 OK", b"x"), ("127.0.0.1", 5060))  # a duplicate
    assert got == [200]


def test_percentiles_are_nearest_rank_over_successes():
    r = PhaseResult("p", 100, latencies={i: (i + 1) / 1000 for i in range(100)}, busy=2.0)
    assert (r.ok, r.rate) == (100, 50.0)
    assert (r.percentile(0.5), r.percentile(0.99), r.percentile(1.0)) == (0.05, 0.099, 0.1)
    assert PhaseResult("empty", 3).percentile(0.5) == 0.0


def _timed(name: str, rate: float) -> PhaseResult:
    """100 successes in 100/rate seconds."""
    return PhaseResult(name, 100, latencies={i: 0.01 for i in range(100)}, busy=100 / rate)


def test_the_ratio_is_taken_against_the_median_relay_round():
    r = Report()
    r.add(_timed("IPsec 401 step", 200))
    r.two_step("IPsec", _timed("IPsec 401 step", 200), _timed("IPsec protected REGISTER", 200))
    for n, rate in enumerate((800, 400, 600), 1):  # a burst slowed round 2
        r.two_step(f"relay #{n}", _timed(f"relay 401 step #{n}", rate),
                   _timed(f"relay REGISTER #{n}", rate), relay_round=True)
    ratios, what = r.ratios()
    assert ratios == pytest.approx({"401 step": 200 / 600, "two-step": 100 / 300})
    assert what == "relay: the median of 3 rounds (401 step 400-800/s, two-step 200-400/s)"
    one = Report()
    one.add(_timed("IPsec 401 step", 200))
    one.two_step("relay", _timed("relay 401 step", 800), _timed("relay REGISTER", 800),
                 relay_round=True)
    assert one.ratios() == ({"401 step": 0.25}, "relay: one round")


STRACE_TABLE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 33.33    0.010000          11       881           pread64
 33.33    0.010000          17       562           fcntl
  0.00    0.000000           0      1463           pwrite64
  0.00    0.000000           0        55        55 pause
  0.00    0.000000           0         1           getpid
------ ----------- ----------- --------- --------- ----------------
100.00    0.030000           7      2962        55 total
"""


def test_strace_tables_become_calls_per_step(tmp_path):
    table = tmp_path / "phase.strace"
    table.write_text(STRACE_TABLE)
    assert calls_per_step(table, 50) == ("59.2 system calls per step: pwrite64 29.3, "
                                         "pread64 17.6, fcntl 11.2, pause 1.1")


def test_strace_logs_of_each_process_become_calls_per_step(tmp_path):
    """--strace-log: strace -ff writes PHASE.strace.PID per process, each call on its line
    with its time; a call strace shows resumed or unfinished counts once."""
    (tmp_path / "phase.strace.101").write_text(
        '15:15:29.826708 recvfrom(5, "SIP/2.0 401"..., 65535, 0, NULL, NULL) = 547 <0.0006>\n'
        "15:15:29.830138 fcntl(30, F_OFD_SETLKW, {l_type=F_WRLCK}) = 0 <0.0004>\n"
        "15:15:29.831574 fcntl(31, F_OFD_SETLKW, {l_type=F_WRLCK} <unfinished ...>\n"
        "15:15:29.863563 <... fcntl resumed>) = 0 <0.0303>\n")
    (tmp_path / "phase.strace.102").write_text(
        '15:15:29.9 pwrite64(27, "\\0\\0", 24, 869352) = 24 <0.0002>\n'
        "15:15:29.9 +++ exited with 0 +++\n")
    assert calls_per_step(tmp_path / "phase.strace", 2) == (
        "2.0 system calls per step: fcntl 1.0, pwrite64 0.5, recvfrom 0.5")


def test_the_busiest_processes_are_shown_per_step_most_first():
    assert busiest({854: 1.85, 855: 1.89, 879: 0.04, 722: 0.0}, 1000) == (
        "busiest Kamailio processes, ms of CPU per step: 855 1.89, 854 1.85, 879 0.04")
    assert busiest({1: 0.0}, 10).endswith("none measurable")
    assert busiest({854: 300, 855: 1200}, 100, what="page faults") == (
        "busiest Kamailio processes, page faults per step: 855 12.0, 854 3.0")


def test_kamailio_cpu_is_read_per_process_and_shown_per_step():
    user, system, faults = process_stat(os.getpid())
    assert user > 0 and system >= 0 and faults > 0
    assert process_stat(2 ** 22 + 1) is None  # no such process
    r = PhaseResult("p", 4, latencies={i: 0.1 for i in range(4)}, server_cpu=(0.01, 0.002))
    assert r.server_ms() == ", Kamailio 2.50 + 0.50 ms CPU"
    r.server_faults = 30
    assert r.server_ms() == ", Kamailio 2.50 + 0.50 ms CPU, 7.5 page faults"
    assert PhaseResult("p", 4).server_ms() == ""


# ---- one phone, driven by hand: what it sends, what it accepts, how it names failures ----

class FakeSock:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, dest: tuple) -> None:
        self.sent.append((data, dest))


class FakeEngine:
    run_id, pcscf, timeout, clock = "r", "10.90.0.1", 32.0, 100.0

    def __init__(self) -> None:
        self.finished: list[str | None] = []
        self.notes: list[str] = []
        self.timers: list[float] = []

    def schedule(self, when, phone, token):
        self.timers.append(when)

    def note(self, kind):
        self.notes.append(kind)

    def retransmitted(self):
        self.notes.append("retransmitted")

    def finish(self, phone, cause):
        self.finished.append(cause)


SERVER = (b"ipsec-3gpp;q=0.1;prot=esp;mod=trans;spi-c=4096;spi-s=4097;port-c=5100;port-s=5300;"
          b"alg=hmac-sha-1-96;ealg=aes-cbc")


@pytest.fixture
def phone():
    from tools.load.phone import Phone

    p = Phone(0, "10.90.1.1", 10000, FakeEngine(), ("hmac-sha-1-96", "aes-cbc"))
    p.socks = {port: FakeSock() for port in (p.port_plain, p.port_us, *p.ports_uc)}
    return p


def _answer(phone, status: bytes, extra: bytes = b"") -> bytes:
    sock = phone.socks[phone.port_plain] if phone.step == "401 step" else phone.tx[0]
    request = sock.sent[-1][0]
    return sip.reply(request, status, b"t", extra)


def _challenge(nonce: bytes = b"n1", server: bytes = SERVER, keys: bytes = b"") -> bytes:
    auth = b'WWW-Authenticate: Digest nonce="%s"%s\r\n' % (nonce, keys)
    return auth + (b"Security-Server: %s\r\n" % server if server else b"")


def test_first_401_gives_the_pending_tunnel_with_the_nonces_keys(phone):
    phone.start_challenge()
    request, dest = phone.socks[phone.port_plain].sent[0]
    assert dest == ("10.90.0.1", 5060) and b"\r\nSecurity-Client: ipsec-3gpp;alg=hmac-sha-1-96" in request
    phone.on_datagram(phone.port_plain, _answer(phone, b"401 Unauthorized", _challenge()), ("10.90.0.1", 5060))
    assert phone.eng.finished == [None]
    t = phone.pending
    ck, ik, res = aka(phone.aor, b"n1")
    assert (t.port_pc, t.port_ps, t.spi_pc, t.spi_ps, t.ck, t.ik) == (5100, 5300, 4096, 4097, ck, ik)
    assert (t.port_uc, t.port_us, t.spi_uc, t.spi_us) == (10002, 10001, 0x10000000, 0x10000001)
    assert phone.res == res and phone.pending_server == SERVER.decode()


@pytest.mark.parametrize("challenge,cause", [
    (_challenge(keys=b', ck="00", ik="11"'), "401 step: CK/IK reached the phone"),
    (_challenge(server=b""), "401 step: 401 without Security-Server"),
    (_challenge(server=SERVER.replace(b"aes-cbc", b"null")),
     "401 step: Security-Server names algorithms we did not offer"),
])
def test_a_bad_401_is_a_failure_named_by_its_cause(phone, challenge, cause):
    phone.start_challenge()
    phone.on_datagram(phone.port_plain, _answer(phone, b"401 Unauthorized", challenge), ("10.90.0.1", 5060))
    assert phone.eng.finished == [cause] and phone.failed == cause


def test_an_error_status_is_the_cause(phone):
    phone.start_challenge()
    phone.on_datagram(phone.port_plain, _answer(phone, b"503 Service Unavailable"), ("10.90.0.1", 5060))
    assert phone.eng.finished == ["401 step: status 503 Service Unavailable"]


def _registered_pending(phone) -> None:
    phone.start_challenge()
    phone.on_datagram(phone.port_plain, _answer(phone, b"401 Unauthorized", _challenge()), ("10.90.0.1", 5060))
    phone.start_authenticate()


def test_protected_register_goes_uc_to_ps_and_its_200_must_come_pc_to_us(phone):
    _registered_pending(phone)
    request, dest = phone.socks[10002].sent[0]
    assert dest == ("10.90.0.1", 5300)
    assert b"\r\nSecurity-Verify: " + SERVER + b"\r\n" in request
    phone.on_datagram(phone.port_us, _answer(phone, b"200 OK"), ("10.90.0.1", 5100))
    assert phone.eng.finished == [None, None] and phone.tunnel == phone.pending


def test_a_200_outside_the_sas_is_named(phone):
    _registered_pending(phone)
    phone.on_datagram(phone.port_plain, _answer(phone, b"200 OK"), ("10.90.0.1", 5060))
    assert phone.eng.finished[-1] == ("protected REGISTER: 200 arrived on the plain port "
                                      "from P-CSCF port 5060")


def test_retransmits_the_same_bytes_until_the_deadline(phone):
    phone.start_challenge()
    sock = phone.socks[phone.port_plain]
    phone.on_timer(100.5)
    assert sock.sent[1] == sock.sent[0] and phone.eng.timers == [100.5, 101.5]
    phone.on_timer(132.0)
    assert phone.eng.finished == ["401 step: timeout"] and len(sock.sent) == 2


def test_strays_tell_a_repeated_answer_from_a_second_transactions(phone):
    phone.start_challenge()
    first = _answer(phone, b"401 Unauthorized", _challenge())
    phone.on_datagram(phone.port_plain, first, ("10.90.0.1", 5060))
    phone.on_datagram(phone.port_plain, first, ("10.90.0.1", 5060))
    phone.on_datagram(phone.port_plain, _answer(phone, b"401 Unauthorized", _challenge(b"n2")),
                      ("10.90.0.1", 5060))
    assert phone.eng.notes == [
        "stray response: the final 401 Unauthorized to REGISTER again",
        "stray response: a second, different final 401 Unauthorized to REGISTER"]
    phone.start_authenticate()
    phone.on_datagram(phone.port_us, _answer(phone, b"403 Forbidden"), ("10.90.0.1", 5100))
    assert phone.eng.finished[-1] == ("protected REGISTER: status 403 Forbidden; earlier: two "
                                      "different final responses (401, 401) to one REGISTER")


# ---- the event loop over loopback sockets: the stub plays the proxy on 127.77.0.1:5060 ----

@pytest.fixture
def loop():
    """An engine, two phones on 127.77.1.x and the stub listening where phones send."""
    from tools.load.engine import Engine
    from tools.load.phone import Phone

    engine = Engine("127.77.0.1", 1.2, xfrm=None)  # timeout: one retransmission, at 0.5 s
    (stub_sock,) = _bound([("127.77.0.1", 5060)])
    engine.stub = Scscf(stub_sock, ("127.77.0.1", 5060))
    phones = [Phone(i, f"127.77.1.{i + 1}", 20000, engine, ("hmac-sha-1-96", "aes-cbc"))
              for i in range(2)]
    socks = []
    for p in phones:
        ports = (p.port_plain, p.port_us, *p.ports_uc)
        for port, s in zip(ports, _bound([(p.ip, port) for port in ports])):
            p.socks[port] = s
            engine.watch(s, p.on_datagram, port)
            socks.append(s)
    yield engine, stub_sock, phones
    engine.close()
    for s in [stub_sock, *socks]:
        s.close()


def _bound(endpoints):
    out = []
    for ep in endpoints:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(ep)
        out.append(s)
    return out


def test_a_phase_runs_every_phone_through_real_sockets(loop):
    from tools.load.phone import Phone

    engine, stub_sock, phones = loop
    engine.watch(stub_sock, engine.stub.on_datagram, 5060)
    first = engine.run_phase("relay 401 step", phones, Phone.start_relay_challenge, 1)
    second = engine.run_phase("relay REGISTER", phones, Phone.start_relay_authenticate, 2)
    assert (first.ok, second.ok, first.failures, second.failures) == (2, 2, {}, {})
    assert engine.stub.contacts[b"sip:u1@ims.test"] == b"sip:u1@127.77.1.2:20001"


def test_a_lost_request_is_retransmitted_and_a_silent_peer_times_out(loop):
    from tools.load.phone import Phone

    engine, stub_sock, phones = loop
    state = {"silent": False, "seen": set()}

    def lossy(port, data, addr):
        """The first copy of each request is lost; nothing is answered once silent."""
        if state["silent"] or data not in state["seen"]:
            state["seen"].add(data)
            return
        engine.stub.on_datagram(port, data, addr)

    engine.watch(stub_sock, lossy, 5060)
    r = engine.run_phase("relay 401 step", phones[:1], Phone.start_relay_challenge, 1)
    assert (r.ok, r.retransmits) == (1, 1) and 0.5 <= r.latencies[0] < 1.0
    state["silent"] = True
    r = engine.run_phase("relay 401 step", phones[1:], Phone.start_relay_challenge, 1)
    assert (r.failures, r.retransmits) == ({"relay 401 step: timeout": 1}, 1)
    assert 1.2 <= r.wall < 1.5 and r.busy == 0


def test_the_watchdog_ends_a_phase_whose_proxy_died(loop):
    from tools.load.phone import Phone

    engine, _, phones = loop

    def dead():
        raise RuntimeError("kamailio exited")

    engine.watchdog = dead
    with pytest.raises(RuntimeError, match="kamailio exited"):
        engine.run_phase("relay 401 step", phones, Phone.start_relay_challenge, 2)


def test_warm_up_and_relay_rounds_are_checked_and_default_to_the_cold_comparison():
    from tools.load.__main__ import parse
    opts = parse([])
    assert (opts.warm_up, opts.relay_rounds) == (0, 1)
    opts = parse(["--warm-up", "200", "--relay-rounds", "3", "-n", "1000"])
    assert (opts.warm_up, opts.relay_rounds, opts.phones) == (200, 3, 1000)
    for bad in (["--relay-rounds", "0"], ["--warm-up", "-1"], ["-n", "60000", "--warm-up", "1"]):
        with pytest.raises(SystemExit):
            parse(bad)


# ---- the floor experiment's patches (tools/load/floor/, README "The floor") ----

FLOOR_CHECK = """
import os, sys
from ipsec.store import schema
from ipsec import tunnel
db = schema.connect(sys.argv[1], 1.0)
assert db.execute("PRAGMA database_list").fetchone()[2] == "", "the store is not in memory"
assert not os.path.exists(sys.argv[1]), "the store made a file"
class NoKernel:
    def batch(self, messages):
        raise AssertionError("the install reached the kernel")
t = tunnel.Tunnel("10.90.0.1", "10.90.1.1", 5100, 5300, 10002, 10001, 4096, 4097,
                  0x10000000, 0x10000001, "hmac-sha-1-96", "aes-cbc", bytes(16), bytes(16))
tunnel.install(NoKernel(), t)
print("floor")
"""


def test_the_floor_patches_apply_to_this_code_and_take_the_store_and_kernel_off(tmp_path):
    """The patches the README's floor figures were measured with still apply to the code as
    it is, and do what they say: each process's store in memory (no file), the tunnel's
    netlink messages built but never sent. Without them the same check fails."""
    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "ipsec", tmp_path / "ipsec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    run = [sys.executable, "-c", FLOOR_CHECK]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    unpatched = subprocess.run([*run, str(tmp_path / "a.db")], cwd=tmp_path, env=env,
                               capture_output=True, text=True)
    assert unpatched.returncode != 0 and "not in memory" in unpatched.stderr
    for patch in ("store.patch", "kernel.patch"):
        subprocess.run(["git", "apply", str(root / "tools" / "load" / "floor" / patch)],
                       cwd=tmp_path, check=True)
    patched = subprocess.run([*run, str(tmp_path / "b.db")], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert patched.stdout.strip() == "floor", patched.stderr
