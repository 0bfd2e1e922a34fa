"""The end-to-end rig: real Kamailio with our kamailio.cfg in the P-CSCF namespace, an S-CSCF
stub behind it, and a phone on the other side of a veth pair that sets up ITS side of the SAs
with `ip xfrm` from the Security-Server it received.

The phone, the stub and the kernel checks are test code, independent of `ipsec/` (they reuse
the kernel tests' link, UE-side `ip xfrm` and capture helpers in tests/kernel/esp_net.py).
"""
from __future__ import annotations

import os
import queue
import random
import re
import secrets
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import esp_net
import invariant
from esp_net import ADDRS, Link, run
from ipsec.tunnel import Tunnel
from ipsec.xfrm.netns import entered
from sip import Msg, hostport, params, parse, read_stream, reply, token, uri_of, via_sent_by

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "kamailio.cfg"
SCSCF_PORT = 6060
WAIT = 8.0
START_TIMEOUT = 120.0  # User-mode Linux starts a Python-loaded worker in ~0.06 s (README)


def _socket(ns: str, family: int, kind: int) -> socket.socket:
    with entered(ns):
        s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return s


# ---- Kamailio ----------------------------------------------------------------------------

class Kamailio:
    """Started as a service manager would: clean environment, absolute cfg, any directory."""

    def __init__(self, link: Link, run_dir: Path, **defines: str) -> None:
        self.link, self.run_dir = link, run_dir
        pc4, pc6 = ADDRS[4][0], ADDRS[6][0]
        self.defines = {
            "PCSCF_IP": pc4, "PCSCF_IP6": f"[{pc6}]",
            "NEXT_HOP": f'"sip:{pc4}:{SCSCF_PORT}"',
            "IPSEC_LISTEN_ADDR": f'"{pc4}"', "IPSEC_LISTEN_ADDR6": f'"{pc6}"',
            "IPSEC_SPI_ID_START": "4096", "RUN_DIR": f'"{run_dir}"', "CHILDREN": "2",
            "EXPIRY_GRACE": "2",
        }
        self.defines.update(defines)
        self.proc: subprocess.Popen | None = None
        self.log_path = run_dir / "kamailio.log"

    def start(self, prefix: tuple[str, ...] = ()) -> float:
        """Start and wait until every UDP socket has a worker: 5060 answers OPTIONS, then
        every protected socket does (the C module's sockets get their workers last, one
        socket after the other: with many port pairs that takes a while). Returns the
        seconds that took. `prefix`: a command to run it through (e.g. prlimit)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        args = [*prefix, "ip", "netns", "exec", self.link.pc, "env", "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "kamailio", "-f", str(CFG), "-DD", "-E",
                "-Y", str(self.run_dir), "-w", str(self.run_dir)]
        for name, value in self.defines.items():
            args += ["-A", f"{name}={value}"]
        t0 = time.monotonic()
        with open(self.log_path, "a") as log:
            # a process group of its own: stop() ends exactly this Kamailio's processes
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd="/",
                                         start_new_session=True)
        deadline = t0 + START_TIMEOUT
        self._wait_answers([(4, ADDRS[4][0], 5060)], deadline)
        self._wait_answers(self.protected_sockets(), deadline)
        return time.monotonic() - t0

    def protected_sockets(self) -> list[tuple[int, str, int]]:
        """(family, address, port) of every protected UDP socket the defines ask for."""
        d = self.defines
        pairs = int(d.get("IPSEC_MAX_CONNECTIONS", "2"))
        ports = sorted({base + i for base in (int(d.get("IPSEC_CLIENT_PORT", "5062")),
                                              int(d.get("IPSEC_SERVER_PORT", "5063")))
                        for i in range(pairs)})
        out = []
        for family, name in ((4, "IPSEC_LISTEN_ADDR"), (6, "IPSEC_LISTEN_ADDR6")):
            addr = d.get(name, "").strip('"')
            out += [(family, addr, port) for port in ports if addr]
        return out

    def _wait_answers(self, targets: list[tuple[int, str, int]], deadline: float) -> None:
        """OPTIONS to each (family, address, port), again every 0.5 s, until each answered."""
        socks = {}
        for family in {f for f, _, _ in targets}:
            socks[family] = _socket(self.link.pc, family, socket.SOCK_DGRAM)
            socks[family].bind((ADDRS[family][0], 0))
        waiting = {token(): target for target in targets}  # by the Call-ID of its OPTIONS
        try:
            while waiting:
                if self.proc.poll() is not None:
                    raise AssertionError(f"kamailio exited {self.proc.returncode}:\n{self.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"kamailio: {len(waiting)} sockets do not answer OPTIONS, "
                                         f"e.g. {sorted(waiting.values())[0]}:\n{self.log()[-3000:]}")
                for call_id, (family, addr, port) in waiting.items():
                    s = socks[family]
                    host = hostport(addr, port)
                    opt = Msg(f"OPTIONS sip:{host} SIP/2.0")
                    opt.add("Via", f"SIP/2.0/UDP {hostport(ADDRS[family][0], s.getsockname()[1])};"
                                   f"branch=z9hG4bK{token()}")
                    for n, v in (("From", f"<sip:probe@{host}>;tag=1"), ("To", f"<sip:{host}>"),
                                 ("Call-ID", call_id), ("CSeq", "1 OPTIONS"), ("Max-Forwards", "70")):
                        opt.add(n, v)
                    s.sendto(opt.encode(), (addr, port))
                until = time.monotonic() + 0.5
                while waiting and (left := until - time.monotonic()) > 0:
                    ready, _, _ = select.select(list(socks.values()), [], [], left)
                    for s in ready:
                        try:
                            r = parse(s.recv(65535))
                        except OSError:
                            continue
                        if r.status == 200:
                            waiting.pop(r.get("Call-ID"), None)
        finally:
            for s in socks.values():
                s.close()

    def processes(self) -> list[int]:
        """Process ids of this Kamailio (its process group: main and every worker)."""
        if self.proc is None:
            return []
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        pgrp = int(f.read().rsplit(b")", 1)[1].split()[2])
                except (OSError, ValueError, IndexError):
                    continue
                if pgrp == self.proc.pid:
                    out.append(int(entry))
        return out

    @property
    def store_path(self) -> Path:
        return self.run_dir / "ipsec-pcscf.sqlite"

    def stop(self, check: bool = True) -> None:
        """Stop this Kamailio; first, unless `check` is False, look at the state invariant
        (tests/kernel/invariant.py) while it still runs, and raise after stopping if it fails."""
        if self.proc is None:
            return
        found: list[str] = []
        if check and self.proc.poll() is None and self.store_path.exists():
            found = invariant.settled_problems(self.link.pc, self.store_path, lifetimes=True)
        self._stop()
        assert not found, "store and kernel disagree:\n  " + "\n  ".join(found[:40])

    def stop_and_check(self) -> None:
        """The fixtures' teardown: stop (checking the state invariant), then no Python
        exception may have reached Kamailio's log."""
        self.stop()
        errors = [l for l in self.log().splitlines()
                  if "Unhandled exception" in l or "Traceback" in l]
        assert not errors, "Python errors in Kamailio:\n" + "\n".join(errors)

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        # workers outlive a killed main now and then: nothing of ours may keep the ports
        # (only this Kamailio's group: other Kamailios on the machine are not ours to end)
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        self.proc.wait()
        time.sleep(0.3)

    def statistic(self, name: str) -> int:
        """One of the module's counters (group `script`), read with kamcmd over the ctl socket."""
        out = subprocess.run(["ip", "netns", "exec", self.link.pc, "kamcmd", "-s",
                              f"unix:{self.run_dir}/kamailio_ctl", "stats.get_statistics",
                              "script:"],
                             check=True, capture_output=True, text=True, timeout=10).stdout
        found = re.search(rf"script:{re.escape(name)} = (\d+)", out)
        assert found, out
        return int(found[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# ---- the S-CSCF stub ---------------------------------------------------------------------

class Scscf:
    """Answers REGISTER with 401 (random or fixed CK/IK) then 200; answers calls; sends calls."""

    def __init__(self, link: Link) -> None:
        self.addr = ADDRS[4][0]
        self.sock = _socket(link.pc, 4, socket.SOCK_DGRAM)
        self.sock.bind((self.addr, SCSCF_PORT))
        self.sock.settimeout(0.2)
        # nonce -> CK, IK: what the phone's USIM derives from the challenge (RAND) it received
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        self.fixed_keys: tuple[bytes, bytes] | None = None
        self.expires: int | None = None  # override what the 200 OK grants
        # answer each challenged REGISTER a second time, with other keys, as a stateless core
        # answers TM's retransmission: TM relays the first 401 only
        self.second_challenge = False
        # answer REGISTERs with a 401 (with keys) whose P-CSCF Via branch matches no
        # transaction: what a late answer looks like once TM has forgotten its REGISTER
        self.stray_challenge = False
        self.silent = False  # answer nothing (the hostile-input flood)
        self.hold: set[str] = set()  # AoRs whose REGISTERs it leaves unanswered (a slow HSS)
        self.paths: dict[str, str] = {}
        self.pcscf_port = 5060  # where its requests enter the P-CSCF (a core socket: CORE_PORT)
        self.associated: list[str] = []  # the 200 OK's P-Associated-URI (none when empty)
        self.seen: list[Msg] = []
        self.replies: "queue.Queue[Msg]" = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if self.silent:
                continue  # hostile input relayed by the P-CSCF: not ours to parse
            msg = parse(data)
            self.seen.append(msg)
            if not msg.is_request:
                self.replies.put(msg)
                continue
            handler = getattr(self, "_on_" + msg.method.lower(), None)
            if handler:
                handler(msg)

    def _send(self, msg: Msg, dest: tuple[str, int]) -> None:
        self.sock.sendto(msg.encode(), dest)

    def _answer(self, req: Msg, r: Msg) -> None:
        self._send(r, via_sent_by(req.get("Via")))

    def _on_register(self, req: Msg) -> None:
        aor = uri_of(req.get("To"))
        if aor in self.hold:
            return
        auth = req.get("Authorization") or ""
        if 'response="' in auth and 'response=""' not in auth:
            r = reply(req, 200, "OK", to_tag=token())
            for c in req.all("Contact"):
                exp = self.expires if self.expires is not None else int(
                    params(c).get("expires", req.get("Expires") or 600))
                r.add("Contact", f"<{uri_of(c)}>;expires={exp}")
            if req.get("Path"):
                r.add("Path", req.get("Path"))
                self.paths[aor] = req.get("Path")
            if self.associated:
                r.add("P-Associated-URI", ", ".join(f"<{u}>" for u in self.associated))
            self._answer(req, r)
            return
        ck, ik = self.fixed_keys or (secrets.token_bytes(16), secrets.token_bytes(16))
        if self.stray_challenge:
            r = self._challenge(req, ck, ik)
            name, top = r.headers[0]
            r.headers[0] = (name, re.sub(r"branch=[^;,\s]+", "branch=z9hG4bKgone", top))
            self._answer(req, r)
            return
        self._answer(req, self._challenge(req, ck, ik))
        if self.second_challenge:
            self._answer(req, self._challenge(req, secrets.token_bytes(16), secrets.token_bytes(16)))

    def _challenge(self, req: Msg, ck: bytes, ik: bytes) -> Msg:
        nonce = secrets.token_urlsafe(24)
        self.keys[nonce] = (ck, ik)
        r = reply(req, 401, "Unauthorized - Challenging the UE", to_tag=token())
        r.add("WWW-Authenticate",
              f'Digest realm="ims.test", nonce="{nonce}", algorithm=AKAv1-MD5, '
              f'ck="{ck.hex()}", ik="{ik.hex()}", qop="auth"')
        return r

    def _on_invite(self, req: Msg) -> None:  # a call from the phone: ring, answer
        tag = token()
        self._answer(req, reply(req, 180, "Ringing", to_tag=tag))
        ok = reply(req, 200, "OK", to_tag=tag)
        ok.add("Contact", f"<sip:callee@{self.addr}:{SCSCF_PORT}>")
        self._answer(req, ok)

    def _on_bye(self, req: Msg) -> None:
        self._answer(req, reply(req, 200, "OK"))

    def _on_message(self, req: Msg) -> None:
        self._answer(req, reply(req, 200, "OK", to_tag=token()))

    def request(self, msg: Msg) -> None:
        """Send a request into the P-CSCF (port 5060, or its core socket's port)."""
        self._send(msg, (self.addr, self.pcscf_port))

    def wait_reply(self, status: int, cseq_method: str, timeout: float = WAIT) -> Msg:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = self.replies.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if r.status == status and r.method == cseq_method:
                return r
        raise AssertionError(f"S-CSCF: no {status} to {cseq_method}")

    def new_request(self, method: str, ruri: str, *, call_id: str, from_tag: str,
                    to: str, cseq: int, route: list[str], body: str = "") -> Msg:
        m = Msg(f"{method} {ruri} SIP/2.0", body=body)
        m.add("Via", f"SIP/2.0/UDP {self.addr}:{SCSCF_PORT};branch=z9hG4bK{token()}")
        m.add("Max-Forwards", "70")
        for r in route:
            m.add("Route", r)
        m.add("From", f"<sip:bob@ims.test>;tag={from_tag}")
        m.add("To", to)
        m.add("Call-ID", call_id)
        m.add("CSeq", f"{cseq} {method}")
        m.add("Contact", f"<sip:bob@{self.addr}:{SCSCF_PORT}>")
        return m


# ---- the phone ---------------------------------------------------------------------------

_next_base = iter(range(41000, 60000, 10))


@dataclass
class Phone:
    """A UE on the far side of the link: SIP over UDP or TCP, its SAs set up with `ip xfrm`.

    `tunnel` is the SA set in use; `offer_*` are the SPIs and ports of its Security-Client
    (new ones for every new SA set, as 33.203 asks of a phone).
    """

    link: Link
    scscf: Scscf
    family: int = 4
    proto: str = "udp"
    user: str = "alice"
    offer: tuple[str, str] = ("hmac-sha-1-96", "aes-cbc")
    tunnel: Tunnel | None = None
    security_server: str = ""
    seen: list[Msg] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ip = ADDRS[self.family][1]
        self.pcscf = ADDRS[self.family][0]
        self.call_id = token()
        self.cseq = 0
        self.tag = token()
        self._udp: dict[int, socket.socket] = {}
        self._listen: dict[int, socket.socket] = {}
        self._tcp: dict[object, socket.socket] = {}
        self._bufs: dict[object, bytearray] = {}
        self._last: tuple[Msg, int, int] | None = None
        self.port_plain = self._open(next(_next_base), listen=False)
        self.new_offer()

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@ims.test"

    def _open(self, port: int, listen: bool) -> int:
        s = _socket(self.link.ue, self.family, socket.SOCK_DGRAM)
        s.bind((self.ip, port))
        s.settimeout(0.05)
        self._udp[port] = s
        if listen:
            t = _socket(self.link.ue, self.family, socket.SOCK_STREAM)
            t.bind((self.ip, port))
            t.listen(4)
            t.settimeout(0.01)
            self._listen[port] = t
        return port

    def new_offer(self, keep_server_port: bool = False) -> None:
        """Fresh SPIs and ports for the next Security-Client; on a re-key a phone keeps its
        protected server port and takes a new client port (33.203 7.4)."""
        base = next(_next_base)
        self.offer_uc = self._open(base, listen=False)
        if not keep_server_port:
            self.offer_us = self._open(base + 1, listen=True)
        self.offer_spi_uc = random.randrange(1 << 20, 1 << 31)
        self.offer_spi_us = random.randrange(1 << 20, 1 << 31)

    def close(self) -> None:
        for s in [*self._udp.values(), *self._tcp.values(), *self._listen.values()]:
            s.close()

    # -- sending -------------------------------------------------------------------------
    def contact_uri(self, port: int) -> str:
        return f"sip:{self.user}@{hostport(self.ip, port)}" + (
            ";transport=tcp" if self.proto == "tcp" else "")

    def security_client(self) -> str:
        alg, ealg = self.offer
        return (f"ipsec-3gpp;alg={alg};ealg={ealg};prot=esp;mod=trans;spi-c={self.offer_spi_uc};"
                f"spi-s={self.offer_spi_us};port-c={self.offer_uc};port-s={self.offer_us}")

    def _request(self, method: str, ruri: str, via_port: int) -> Msg:
        self.cseq += 1
        m = Msg(f"{method} {ruri} SIP/2.0")
        m.add("Via", f"SIP/2.0/{self.proto.upper()} {hostport(self.ip, via_port)};"
                     f"branch=z9hG4bK{token()};rport")
        m.add("Max-Forwards", "70")
        m.add("From", f"<{self.aor}>;tag={self.tag}")
        return m

    def register(self, *, protected: bool, expires: int = 600, verify: str | None = None,
                 response: bool = False, client: str | None = None) -> Msg:
        """A REGISTER: unprotected from the plain port, or through the current SAs.
        `client`: the Security-Client to send instead of our offer ("" for none)."""
        m = self._request("REGISTER", "sip:ims.test", self.tunnel.port_us if protected else self.offer_us)
        m.add("To", f"<{self.aor}>")
        m.add("Call-ID", self.call_id)
        m.add("CSeq", f"{self.cseq} REGISTER")
        m.add("Contact", f"<{self.contact_uri(self.offer_us)}>;expires={expires}")
        m.add("Expires", str(expires))
        m.add("Supported", "path, sec-agree")
        m.add("Require", "sec-agree")
        m.add("Proxy-Require", "sec-agree")
        if client != "":
            m.add("Security-Client", client or self.security_client())
        if verify is not None:
            m.add("Security-Verify", verify)
        m.add("Authorization",
              f'Digest username="{self.user}@ims.test", realm="ims.test", nonce="n", '
              f'uri="sip:ims.test", response="{"a" * 32 if response else ""}"')
        self.send_protected(m) if protected else self.send(m, self.port_plain, 5060)
        return m

    def request(self, method: str, ruri: str, *, call_id: str, to: str, route: str | None = None,
                body: str = "") -> Msg:
        """An initial request through the current SAs (port_uc -> port_ps)."""
        t = self.tunnel
        m = self._request(method, ruri, t.port_us)
        m.body = body
        if route:
            m.add("Route", route)
        m.add("To", to)
        m.add("Call-ID", call_id)
        m.add("CSeq", f"{self.cseq} {method}")
        m.add("Contact", f"<sip:{self.user}@{hostport(self.ip, t.port_us)}>")
        m.add("Security-Verify", self.security_server)
        m.add("Proxy-Require", "sec-agree")
        m.add("Require", "sec-agree")
        self.send_protected(m)
        return m

    def send_protected(self, m: Msg) -> None:
        self.send(m, self.tunnel.port_uc, self.tunnel.port_ps)

    def send(self, m: Msg, sport: int, dport: int) -> None:
        if self.proto == "udp":
            self._udp[sport].sendto(m.encode(), (self.pcscf, dport))
            self._last = (m, sport, dport)
            return
        key = (sport, dport)
        conn = self._tcp.get(key)
        if conn is None:
            conn = _socket(self.link.ue, self.family, socket.SOCK_STREAM)
            conn.bind((self.ip, sport))
            conn.settimeout(WAIT)
            conn.connect((self.pcscf, dport))
            conn.settimeout(0.01)
            self._tcp[key] = conn
            self._bufs[key] = bytearray()
        conn.sendall(m.encode())

    def retransmit(self, times: int) -> None:
        """The last UDP request again, at once (a phone whose timer A fired while the P-CSCF
        was still busy with the first copy, or several phones' worth of impatience)."""
        m, sport, dport = self._last
        for _ in range(times):
            self._udp[sport].sendto(m.encode(), (self.pcscf, dport))

    def respond(self, req: Msg, key: object, status: int, reason: str, tag: str) -> Msg:
        """Answer a request the P-CSCF brought: UDP from port_us to its Via, TCP on its connection."""
        r = reply(req, status, reason, to_tag=tag)
        if status == 200 and req.method == "INVITE":
            r.add("Contact", f"<sip:{self.user}@{hostport(self.ip, self.tunnel.port_us)}>")
        if self.proto == "udp":
            self._udp[key].sendto(r.encode(), via_sent_by(req.get("Via")))
        else:
            self._tcp[key].sendall(r.encode())
        return r

    # -- receiving -------------------------------------------------------------------------
    def _poll(self, timeout: float = 0.05) -> list[tuple[Msg, object, tuple]]:
        """What arrived on any of the phone's sockets: one select() over all of them."""
        udp = {s: port for port, s in self._udp.items()}
        listening = {s: port for port, s in self._listen.items()}
        tcp = {conn: key for key, conn in self._tcp.items()}
        ready, _, _ = select.select([*udp, *listening, *tcp], [], [], timeout)
        got = []
        for s in ready:
            if s in udp:
                data, peer = s.recvfrom(65535)
                got.append((parse(data), udp[s], peer))
            elif s in listening:
                conn, peer = s.accept()
                key = ("accepted", listening[s], peer[1])
                self._tcp[key] = conn
                self._bufs[key] = bytearray()
            else:
                key = tcp[s]
                try:
                    self._bufs[key] += s.recv(65535)
                except OSError:
                    continue
                while (data := read_stream(self._bufs[key])) is not None:
                    got.append((parse(data), key, s.getpeername()))
        return got

    def wait(self, pred, what: str, timeout: float = WAIT,
             retransmit: bool = False) -> tuple[Msg, object, tuple]:
        """Poll until `pred` holds; over UDP a request is retransmitted as RFC 3261's timer A
        says (0.5 s, doubling), as real phones do."""
        deadline = time.monotonic() + timeout
        interval, resend = 0.5, time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if retransmit and self.proto == "udp" and time.monotonic() >= resend and self._last:
                m, sport, dport = self._last
                self._udp[sport].sendto(m.encode(), (self.pcscf, dport))
                interval = min(interval * 2, 4.0)
                resend = time.monotonic() + interval
            for item in self._poll():
                self.seen.append(item[0])
                if pred(item[0]):
                    return item
        raise AssertionError(f"phone {self.user}: no {what} in {timeout:.0f} s; the last it got: "
                             f"{[_summary(m) for m in self.seen[-5:]]}")

    def wait_reply(self, status: int, method: str, timeout: float = WAIT) -> tuple[Msg, object, tuple]:
        return self.wait(lambda m: not m.is_request and m.status == status and m.method == method,
                         f"{status} to {method}", timeout, retransmit=True)

    # -- the phone's side of IPsec ---------------------------------------------------------
    def setup_sas(self, response: Msg) -> Tunnel:
        """From the 401: our SAs with `ip xfrm`, with the keys the USIM shares with the S-CSCF."""
        server = response.get("Security-Server")
        assert server, "401 without Security-Server"
        p = params(server)
        nonce = re.search(r'nonce="([^"]+)"', response.get("WWW-Authenticate")).group(1)
        ck, ik = self.scscf.keys[nonce]
        t = Tunnel(pcscf=self.pcscf, ue=self.ip, port_pc=int(p["port-c"]),
                   port_ps=int(p["port-s"]), port_uc=self.offer_uc, port_us=self.offer_us,
                   spi_pc=int(p["spi-c"]), spi_ps=int(p["spi-s"]), spi_uc=self.offer_spi_uc,
                   spi_us=self.offer_spi_us, alg=p["alg"], ealg=p["ealg"], ck=ck, ik=ik)
        if t != self.tunnel:
            esp_net.ue_install(self.link, t)
        self.security_server = server
        return t

    def drop_sas(self, t: Tunnel) -> None:
        lines = []
        for src, sport, dst, dport, spi, direction in esp_net.ue_flows(t):
            lines.append(f"xfrm policy delete src {src} dst {dst} proto 0 sport {sport} "
                         f"dport {dport} dir {direction}")
            lines.append(f"xfrm state delete src {src} dst {dst} proto esp spi {spi}")
        run("ip", "-n", self.link.ue, "-batch", "-", stdin="\n".join(lines) + "\n")

    def challenge(self, *, protected: bool, expires: int = 600) -> Msg:
        """REGISTER without credentials -> 401 (to this REGISTER, not an earlier one) -> our
        SAs for what it offers."""
        verify = self.security_server if protected else None
        self.register(protected=protected, expires=expires, verify=verify)
        cseq = f"{self.cseq} REGISTER"
        r401, _, _ = self.wait(lambda m: not m.is_request and m.status == 401
                               and m.get("CSeq") == cseq, "401 to REGISTER", retransmit=True)
        assert_no_keys(r401)
        self.pending = self.setup_sas(r401)
        return r401

    def authenticate(self, expires: int = 600) -> Msg:
        """The protected REGISTER on the SAs of the last 401 -> 200 OK back through them."""
        old, self.tunnel = self.tunnel, self.pending
        self.register(protected=True, expires=expires, verify=self.security_server, response=True)
        ok, key, peer = self.wait_reply(200, "REGISTER")
        if self.proto == "udp":
            assert (key, peer[1]) == (self.tunnel.port_us, self.tunnel.port_pc), (key, peer)
        if old is not None and old != self.tunnel:
            self.drop_sas(old)
        return ok

    def full_registration(self, expires: int = 600) -> Msg:
        self.challenge(protected=self.tunnel is not None, expires=expires)
        return self.authenticate(expires)


# ---- calls -------------------------------------------------------------------------------

def _summary(m: Msg) -> str:
    """One line per message for a failure's text: its first line and CSeq."""
    return f"{m.first} ({m.get('CSeq')})"


def mt_call(phone: Phone, scscf: Scscf) -> None:
    """The S-CSCF calls the phone through the P-CSCF (Path as Route); phone answers; BYE."""
    path = uri_of(scscf.paths[phone.aor])
    call_id, ftag = token(), token()
    ruri = phone.contact_uri(phone.tunnel.port_us)  # the registered Contact
    to = f"<sip:{phone.user}@ims.test>"
    invite = scscf.new_request("INVITE", ruri, call_id=call_id, from_tag=ftag, to=to, cseq=1,
                               route=[f"<{path}>"])
    scscf.request(invite)
    req, key, peer = phone.wait(lambda m: m.is_request and m.method == "INVITE", "INVITE")
    assert peer[1] == phone.tunnel.port_pc
    assert isinstance(key, tuple) == (phone.proto == "tcp"), f"INVITE came over {key}"
    tag = token()
    phone.respond(req, key, 180, "Ringing", tag)
    phone.respond(req, key, 200, "OK", tag)
    r200 = scscf.wait_reply(200, "INVITE")
    routes = list(reversed(r200.all("Record-Route")))
    to_tagged = r200.get("To")
    for method, cseq in (("ACK", 1), ("BYE", 2)):
        m = scscf.new_request(method, uri_of(r200.get("Contact")), call_id=call_id, from_tag=ftag,
                              to=to_tagged, cseq=cseq, route=routes)
        scscf.request(m)
        got, key, _ = phone.wait(lambda x, method=method: x.is_request and x.method == method, method)
    phone.respond(got, key, 200, "OK", tag)
    scscf.wait_reply(200, "BYE")


def mo_call(phone: Phone, scscf: Scscf) -> None:
    """The phone calls out through its SAs; 100/180/200 come back through them; ACK; BYE."""
    call_id = token()
    t = phone.tunnel
    host = phone.pcscf if phone.family == 4 else f"[{phone.pcscf}]"
    route = f"<sip:{host}:{t.port_ps};lr" + (";transport=tcp>" if phone.proto == "tcp" else ">")
    phone.request("INVITE", "sip:bob@ims.test", call_id=call_id, to="<sip:bob@ims.test>", route=route)
    ok, _, _ = phone.wait_reply(200, "INVITE")
    routes = list(reversed(ok.all("Record-Route")))
    assert routes and f":{t.port_ps};" in routes[0], routes
    for method in ("ACK", "BYE"):
        m = phone._request(method, uri_of(ok.get("Contact")), t.port_us)
        for r in routes:
            m.add("Route", r)
        m.add("To", ok.get("To"))
        m.add("Call-ID", call_id)
        m.add("CSeq", f"{phone.cseq} {method}")
        phone.send_protected(m)
    phone.wait_reply(200, "BYE")


def assert_no_keys(msg: Msg) -> None:
    text = msg.text().lower()
    assert not re.search(r"\b(ck|ik)\s*=", text), "CK/IK reached the phone"


# ---- kernel state on the P-CSCF side (read with ip, not with our code) -----------------

def pcscf_states(link: Link) -> list[dict]:
    out = []
    text = run("ip", "-n", link.pc, "xfrm", "state")
    for block in re.split(r"^(?=src )", text, flags=re.M):
        if not block.strip():
            continue
        head = re.match(r"src (\S+) dst (\S+)", block)
        spi = re.search(r"spi (0x[0-9a-f]+)", block)
        sel = re.search(r"sel src (\S+) dst (\S+) .*?sport (\d+).*?dport (\d+)", block, re.S)
        algs = {}
        for kind in ("auth-trunc", "enc", "aead"):
            m = re.search(rf"^\s*{kind} (\S+) (\S*)(?: (\d+))?\s*$", block, re.M)
            if m:
                algs[kind] = (m.group(1), m.group(2), m.group(3))
        out.append({"src": head.group(1), "dst": head.group(2), "spi": int(spi.group(1), 16),
                    "sport": int(sel.group(3)) if sel else 0, "dport": int(sel.group(4)) if sel else 0,
                    "algs": algs})
    return out


def pcscf_policy_count(link: Link) -> int:
    return len(re.findall(r"^src ", run("ip", "-n", link.pc, "xfrm", "policy"), flags=re.M))


def pcscf_policy_ports(link: Link) -> set[tuple[int, int]]:
    """(sport, dport) of every policy on the P-CSCF side, from `ip xfrm policy`."""
    text = run("ip", "-n", link.pc, "xfrm", "policy")
    return {(int(a), int(b)) for a, b in re.findall(r"sport (\d+) dport (\d+)", text)}


def tunnel_gone(link: Link, t: Tunnel) -> bool:
    """None of the tunnel's SAs or policies is left on the P-CSCF side."""
    spis = {s["spi"] for s in pcscf_states(link)}
    flows = {(sp, dp) for _, sp, _, dp, _, _ in esp_net.ue_flows(t)}
    return not spis & {t.spi_pc, t.spi_ps, t.spi_uc, t.spi_us} and not pcscf_policy_ports(link) & flows


def wait_gone(link: Link, t: Tunnel, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not tunnel_gone(link, t):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def expected_algs(t: Tunnel) -> dict[str, tuple[str, str, str | None]]:
    """What `ip xfrm state` shows for (alg, ealg, CK, IK), from 33.203 Annex I (test side)."""
    ck, ik = t.ck, t.ik
    if t.alg == "aes-gmac":
        return {"aead": ("rfc4543(gcm(aes))", (ik + esp_net._salt(ck, ik, 0x58, b"AES_GMAC_SALT")).hex(), "128")}
    if t.ealg == "aes-gcm":
        return {"aead": ("rfc4106(gcm(aes))", (ck + esp_net._salt(ck, ik, 0x59, b"AES_GCM_SALT")).hex(), "128")}
    auth = {"hmac-md5-96": ("hmac(md5)", ik.hex()),
            "hmac-sha-1-96": ("hmac(sha1)", ik.hex() + "00000000")}[t.alg]
    enc = {"null": ("ecb(cipher_null)", ""), "aes-cbc": ("cbc(aes)", ck.hex()),
           "des-ede3-cbc": ("cbc(des3_ede)", (ck + ck[:8]).hex())}[t.ealg]
    return {"auth-trunc": (auth[0], auth[1], "96"), "enc": (enc[0], enc[1], None)}


def assert_kernel_matches(link: Link, t: Tunnel) -> None:
    """The P-CSCF's 4 SAs are those the Security-Server promised, with the right keys."""
    states = {s["spi"]: s for s in pcscf_states(link)}
    want = expected_algs(t)
    for src, sport, dst, dport, spi, _ in esp_net.ue_flows(t):
        s = states.get(spi)
        assert s, f"no SA with spi {spi} on the P-CSCF"
        assert (s["src"], s["dst"], s["sport"], s["dport"]) == (src, dst, sport, dport), s
        got = {k: (n, key.removeprefix("0x").lower(), bits) for k, (n, key, bits) in s["algs"].items()}
        assert got == want, (spi, sorted(got), sorted(want))


def ue_counters(link: Link) -> dict[int, int]:
    return esp_net.packet_counters(link.ue)


def pcscf_counters(link: Link) -> dict[int, int]:
    return esp_net.packet_counters(link.pc)
