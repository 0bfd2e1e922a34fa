"""A flood of challenged REGISTERs while phones re-key and register (issue 10, finding 1):
real Kamailio, real ESP, the S-CSCF stub challenging every REGISTER it gets.

The flood is raw UDP from the test: REGISTERs from 8 addresses x 16 source ports, each with
an AoR, a Call-ID and SPIs of its own, a few hundred a second. The P-CSCF here has 100 SPI
pairs (IPSEC_SPI_ID_RANGE=200), 10 of them kept for re-keys, PENDING_LIFETIME=10 s.
Before (87e7b99^) the first 100 flood REGISTERs took every pair for 240 s: the re-keys of
the registered phones and the new phones got 503.

The flood is also more than Kamailio can serve (FLOOD_RATE, default 400/s). Before
kemi/overload.py, port 5060's queue overflowed and lost the S-CSCF's 401s: TM answered a new
phone 408 for 30 s (CI at 200/s; here at 800/s). Now the flood's hosts are shed from
OVERLOAD_TRANSACTIONS on; a new phone may be told 503 + Retry-After, and comes back.
"""
from __future__ import annotations

import os
import random
import select
import socket
import sqlite3
import threading
import time

import pytest

from esp_net import run
from pcscf_net import Kamailio, Phone, _socket, pcscf_states
from sip import parse, stranger_register, token

FLOOD_HOSTS = [f"10.77.0.{i}" for i in range(100, 108)]
PORTS_PER_HOST = 16
# REGISTERs a second offered: more than Kamailio in User-mode Linux challenges (about 130/s
# here, about 100/s on CI's machine), so the flood also overloads it (kemi/overload.py)
RATE = int(os.environ.get("FLOOD_RATE", "400"))
PATIENCE = 30.0  # a phone's REGISTER transaction gives up after 32 s (RFC 3261 timer F)
PER_HOST = 8  # PENDING_PER_HOST's default
LIFETIME = 10
OVERLOAD = 40  # OVERLOAD_TRANSACTIONS: active transactions from which new REGISTERs get 503
DEFINES = {"IPSEC_SPI_ID_RANGE": "200", "PENDING_LIFETIME": str(LIFETIME),
           "OVERLOAD_TRANSACTIONS": str(OVERLOAD)}
PAIRS = 100


@pytest.fixture(scope="module")
def kamailio(link, scscf, tmp_path_factory):
    for host in FLOOD_HOSTS:
        run("ip", "-n", link.ue, "addr", "add", f"{host}/24", "dev", link.ue_dev)
    k = Kamailio(link, tmp_path_factory.mktemp("kamailio"), **DEFINES)
    k.start()
    yield k
    time.sleep(LIFETIME + 3)  # whatever of the flood was still queued has been swept
    k.stop_and_check()  # the state invariant, then Python errors


class Flood:
    """REGISTERs at RATE a second, round robin over every (address, port); counts the
    answers: 401 with a Security-Server (challenged, SAs staged) or anything else."""

    def __init__(self, link) -> None:
        self.socks = []
        for host in FLOOD_HOSTS:
            for _ in range(PORTS_PER_HOST):
                s = _socket(link.ue, 4, socket.SOCK_DGRAM)
                s.bind((host, 0))
                s.setblocking(False)
                self.socks.append(s)
        self.sent = self.challenged = 0
        self.other: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Flood":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.monotonic() - self.started
        time.sleep(1.0)
        self._drain(0.5)
        for s in self.socks:
            s.close()

    def _register(self, s: socket.socket) -> bytes:
        host, port = s.getsockname()
        return stranger_register(
            f"flood{self.sent}", host, port,
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;prot=esp;mod=trans;"
            f"spi-c={random.randrange(1 << 20, 1 << 31)};spi-s={random.randrange(1 << 20, 1 << 31)};"
            f"port-c={random.randrange(20000, 30000)};port-s={random.randrange(30000, 40000)}")

    def _run(self) -> None:
        step = 0.02
        next_at = time.monotonic()
        while not self._stop.is_set():
            for _ in range(int(RATE * step)):
                s = self.socks[self.sent % len(self.socks)]
                try:
                    s.sendto(self._register(s), ("10.77.0.1", 5060))
                except BlockingIOError:
                    pass
                self.sent += 1
            next_at += step
            while (left := next_at - time.monotonic()) > 0:
                self._drain(left)

    def _drain(self, timeout: float) -> None:
        ready, _, _ = select.select(self.socks, [], [], timeout)
        for s in ready:
            while True:
                try:
                    r = parse(s.recv(65535))
                except (BlockingIOError, ValueError, IndexError):
                    break
                if r.status == 401 and r.get("Security-Server"):
                    self.challenged += 1
                elif r.status >= 200:
                    self.other[r.status] = self.other.get(r.status, 0) + 1


class Rows:
    """The store, read with sqlite3 (not our code) every 0.2 s: the most rows it held."""

    def __init__(self, path) -> None:
        self.path = path
        self.most = {"contacts": 0, "tunnels": 0, "unconfirmed": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> dict[str, int]:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return {
                "contacts": db.execute("SELECT count(*) FROM contacts").fetchone()[0],
                "tunnels": db.execute("SELECT count(*) FROM tunnels").fetchone()[0],
                "unconfirmed": db.execute(
                    "SELECT count(*) FROM contacts WHERE state = 'pending' AND tunnel_id IS NULL"
                    " AND pending_tunnel_id IS NOT NULL").fetchone()[0],
            }
        finally:
            db.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.now().items():
                self.most[key] = max(self.most[key], value)
            time.sleep(0.2)

    def __enter__(self) -> "Rows":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def rss_kb(k: Kamailio) -> int:
    total = 0
    for pid in k.processes():
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def message(phone: Phone) -> None:
    phone.request("MESSAGE", "sip:bob@ims.test", call_id=token(), to="<sip:bob@ims.test>")
    phone.wait_reply(200, "MESSAGE", timeout=PATIENCE)


def register_patiently(phone: Phone) -> tuple[float, int]:
    """Phone.full_registration with a phone's patience: its REGISTERs to port 5060 queue
    behind the flood's (Kamailio serves them in order). Told 503 with Retry-After (the P-CSCF
    sheds new REGISTERs while overloaded), it waits that long and sends a new REGISTER, as
    RFC 3261 21.5.4 asks. Returns the seconds it took and the 503s it got."""
    t0, shed = time.monotonic(), 0
    deadline = t0 + PATIENCE
    while True:
        phone.register(protected=phone.tunnel is not None,
                       verify=phone.security_server if phone.tunnel is not None else None)
        cseq = f"{phone.cseq} REGISTER"
        answer, _, _ = phone.wait(lambda m: not m.is_request and m.status in (401, 503)
                                  and m.get("CSeq") == cseq, "401 to REGISTER",
                                  max(0.1, deadline - time.monotonic()), retransmit=True)
        if answer.status == 401:
            break
        assert phone.tunnel is None, "a REGISTER through the SAs was shed"
        shed += 1
        retry = answer.get("Retry-After")
        assert retry and 1 <= int(retry) <= 5, answer.text()
        time.sleep(int(retry))
    phone.pending = phone.setup_sas(answer)
    old, phone.tunnel = phone.tunnel, phone.pending
    phone.register(protected=True, verify=phone.security_server, response=True)
    phone.wait(lambda m: not m.is_request and m.status == 200 and m.method == "REGISTER",
               "200 to REGISTER", PATIENCE, retransmit=True)
    if old is not None and old != phone.tunnel:
        phone.drop_sas(old)
    return time.monotonic() - t0, shed


def test_a_flood_is_capped_while_phones_rekey_and_register(link, scscf, kamailio):
    registered = [Phone(link, scscf, user=f"reg{i}") for i in range(2)]
    for phone in registered:
        phone.full_registration()
    newcomers = [Phone(link, scscf, user=f"new{i}") for i in range(2)]
    store = kamailio.run_dir / "ipsec-pcscf.sqlite"
    rss_before = rss_kb(kamailio)
    served: list[str] = []
    with Rows(store) as rows, Flood(link) as flood:
        time.sleep(2.0)  # the flood has filled what it can
        for phone in registered:  # 33.203 7.4: new SAs through the old ones
            phone.new_offer(keep_server_port=True)
            took, _ = register_patiently(phone)
            served.append(f"{phone.user} re-keyed in {took:.1f} s")
        for phone in newcomers:
            took, told = register_patiently(phone)
            served.append(f"{phone.user} registered in {took:.1f} s ({told} x 503)")
        for phone in registered + newcomers:
            message(phone)
        time.sleep(max(0.0, 8.0 - (time.monotonic() - flood.started)))
    rss_after = rss_kb(kamailio)
    print(f"\nflood: {flood.sent} REGISTERs in {flood.seconds:.1f} s "
          f"({flood.sent / flood.seconds:.0f}/s), {flood.challenged} challenged, other "
          f"answers {flood.other}; most rows {rows.most}; Kamailio RSS {rss_before} -> "
          f"{rss_after} kB; served: {served}")
    evictions = kamailio.log().count("evicted to make room")
    shed = kamailio.statistic("ipsec_registers_shed")
    print(f"evictions logged: {evictions}; REGISTERs shed (503, overloaded): {shed}")
    assert flood.sent >= 0.8 * RATE * flood.seconds
    assert flood.challenged > PAIRS, "the flood was not challenged beyond the pool's size"
    assert evictions > 0
    assert shed > 0, "the flood overloaded nobody: raise FLOOD_RATE"  # tmx's count was read
    # the flood is capped: at most PENDING_PER_HOST unconfirmed contacts per flood address
    # (plus the new phones', each unconfirmed between its 401 and its protected REGISTER)
    assert rows.most["unconfirmed"] <= PER_HOST * len(FLOOD_HOSTS) + len(newcomers)
    assert rows.most["tunnels"] <= PER_HOST * len(FLOOD_HOSTS) + 2 * len(registered + newcomers)
    # nothing of the flood is left PENDING_LIFETIME after its last challenge: the phones'
    # tunnels only (TM retransmits a REGISTER whose 401 was lost in the queue, so the core's
    # last challenges come up to fr_timer after the flood)
    want = {"contacts": 4, "tunnels": 4, "unconfirmed": 0}
    t0 = time.monotonic()
    while (now := rows.now()) != want and time.monotonic() - t0 < LIFETIME + 45:
        time.sleep(0.5)
    assert now == want, now
    print(f"the flood's rows and SAs gone {time.monotonic() - t0:.1f} s after it stopped")
    assert len(pcscf_states(link)) == 4 * 4
    print(f"Kamailio RSS {LIFETIME + 3} s after the flood: {rss_kb(kamailio)} kB")
    for phone in registered + newcomers:
        message(phone)
