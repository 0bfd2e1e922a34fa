"""Two network namespaces (P-CSCF, UE) joined by a veth pair, with traffic and capture tools.

Everything here is independent of the code under test except `ipsec.xfrm.netns.entered`,
which only switches a thread's namespace: the UE side is configured with `ip xfrm`, counters
are read with `ip -s xfrm state`, packets are seen by tcpdump.
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ipsec.tunnel import Tunnel
from ipsec.xfrm.netns import entered

ADDRS = {4: ("10.77.0.1", "10.77.0.2"), 6: ("fd77::1", "fd77::2")}
TIMEOUT = 3.0


def run(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Link:
    pc: str  # netns names
    ue: str
    ue_dev: str = "veth-ue"


def make_link(tag: str) -> Link:
    link = Link(f"pc-{tag}", f"ue-{tag}")
    for ns in (link.pc, link.ue):
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "link", "add", "veth-pc", "netns", link.pc, "type", "veth",
        "peer", "name", "veth-ue", "netns", link.ue)
    for ns, dev, i in ((link.pc, "veth-pc", 0), (link.ue, "veth-ue", 1)):
        run("ip", "-n", ns, "addr", "add", f"{ADDRS[4][i]}/24", "dev", dev)
        run("ip", "-n", ns, "addr", "add", f"{ADDRS[6][i]}/64", "dev", dev, "nodad")
        run("ip", "-n", ns, "link", "set", dev, "up")
    return link


def drop_link(link: Link) -> None:
    for ns in (link.pc, link.ue):
        run("ip", "netns", "del", ns)


_links = itertools.count()


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    """The P-CSCF and UE namespaces joined by a veth pair, one pair per test module."""
    made = make_link(f"k{next(_links)}")
    yield made
    drop_link(made)


# ---- the UE side, written from the 3GPP tables (TS 33.203 Annex I), not from ipsec/ ----

def _salt(ck: bytes, ik: bytes, fc: int, label: bytes) -> bytes:
    s = bytes([fc]) + label + len(label).to_bytes(2, "big")
    return hmac.new(ck + ik, s, hashlib.sha256).digest()[-4:]


def ip_algs(t: Tunnel) -> str:
    """The `ip xfrm state` ALGO-LIST of a negotiated (alg, ealg) with keys CK, IK."""
    ck, ik = t.ck, t.ik
    if t.alg == "aes-gmac":
        return f"aead 'rfc4543(gcm(aes))' 0x{(ik + _salt(ck, ik, 0x58, b'AES_GMAC_SALT')).hex()} 128"
    if t.ealg == "aes-gcm":
        return f"aead 'rfc4106(gcm(aes))' 0x{(ck + _salt(ck, ik, 0x59, b'AES_GCM_SALT')).hex()} 128"
    auth = {"hmac-md5-96": f"'hmac(md5)' 0x{ik.hex()}",
            "hmac-sha-1-96": f"'hmac(sha1)' 0x{ik.hex()}00000000"}[t.alg]
    enc = {"null": "'ecb(cipher_null)' ''",
           "aes-cbc": f"'cbc(aes)' 0x{ck.hex()}",
           "des-ede3-cbc": f"'cbc(des3_ede)' 0x{(ck + ck[:8]).hex()}"}[t.ealg]
    return f"auth-trunc {auth} 96 enc {enc}"


def ue_flows(t: Tunnel) -> list[tuple[str, int, str, int, int, str]]:
    """(src, sport, dst, dport, spi, UE policy dir) of SA1..SA4 as the UE sees them."""
    return [
        (t.ue, t.port_uc, t.pcscf, t.port_ps, t.spi_ps, "out"),
        (t.pcscf, t.port_ps, t.ue, t.port_uc, t.spi_uc, "in"),
        (t.pcscf, t.port_pc, t.ue, t.port_us, t.spi_us, "in"),
        (t.ue, t.port_us, t.pcscf, t.port_pc, t.spi_pc, "out"),
    ]


def ue_install(link: Link, t: Tunnel) -> None:
    algs = ip_algs(t)
    lines = []
    for src, sport, dst, dport, spi, direction in ue_flows(t):
        sel = f"src {src} dst {dst} proto 0 sport {sport} dport {dport}"
        lines.append(f"xfrm state add src {src} dst {dst} proto esp spi {spi} reqid {spi} "
                     f"mode transport replay-window 32 {algs} sel {sel}")
        lines.append(f"xfrm policy add {sel} dir {direction} "
                     f"tmpl src {src} dst {dst} proto esp reqid {spi} mode transport")
    run("ip", "-n", link.ue, "-batch", "-", stdin="\n".join(lines) + "\n")


def flush_ns(ns: str) -> None:
    run("ip", "-n", ns, "xfrm", "policy", "flush")
    run("ip", "-n", ns, "xfrm", "state", "flush")


def packet_counters(ns: str) -> dict[int, int]:
    """SPI -> packets, from `ip -s xfrm state` (independent of our dump code)."""
    out = {}
    for block in re.split(r"^(?=src )", run("ip", "-n", ns, "-s", "xfrm", "state"), flags=re.M):
        spi = re.search(r"spi (0x[0-9a-f]+)", block)
        cur = re.search(r"lifetime current:\s+(\d+)\(bytes\), (\d+)\(packets\)", block)
        if spi and cur:
            out[int(spi.group(1), 16)] = int(cur.group(2))
    return out


# ---- traffic, in this process: sockets are made inside a namespace and keep it ----

def _sock(ns: str, kind: int, addr: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with entered(ns):
        s = socket.socket(fam, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(TIMEOUT)
    s.bind((addr, port))
    return s


def udp(src_ns: str, src: str, sport: int, dst_ns: str, dst: str, dport: int,
        timeout: float = TIMEOUT) -> bool:
    """Send one datagram src:sport -> dst:dport; True when it arrived."""
    tx = _sock(src_ns, socket.SOCK_DGRAM, src, sport)
    rx = _sock(dst_ns, socket.SOCK_DGRAM, dst, dport)
    rx.settimeout(timeout)
    try:
        tx.sendto(b"udp %d>%d" % (sport, dport), (dst, dport))
        data, peer = rx.recvfrom(2048)
        return data == b"udp %d>%d" % (sport, dport) and peer[1] == sport
    except TimeoutError:
        return False
    finally:
        tx.close()
        rx.close()


def tcp(client_ns: str, caddr: str, cport: int, server_ns: str, saddr: str, sport: int) -> None:
    """A TCP connection caddr:cport -> saddr:sport with data both ways."""
    srv = _sock(server_ns, socket.SOCK_STREAM, saddr, sport)
    srv.listen(1)
    cli = _sock(client_ns, socket.SOCK_STREAM, caddr, cport)
    try:
        cli.connect((saddr, sport))
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            cli.sendall(b"ping")
            assert conn.recv(16) == b"ping"
            conn.sendall(b"pong")
            assert cli.recv(16) == b"pong"
    finally:
        cli.close()
        srv.close()


# ---- capture on the UE's link ----

@dataclass(frozen=True)
class Packet:
    proto: int
    src: str
    dst: str
    sport: int  # for ESP: 0
    dport: int  # for ESP: 0
    spi: int = 0


class Capture:
    """tcpdump on the UE's veth, to a file in /var/tmp, for the duration of a with-block."""

    def __init__(self, link: Link, name: str, bpf: str = "") -> None:
        self.link = link
        self.path = f"/var/tmp/{name}.pcap"
        self.bpf = bpf  # a tcpdump filter expression; empty: every packet
        self.packets: list[Packet] = []

    def __enter__(self) -> "Capture":
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.link.ue, "tcpdump", "-Z", "root", "-i",
             self.link.ue_dev, "-n", "-U", "--immediate-mode", "-w", self.path,
             *([self.bpf] if self.bpf else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        assert "listening on" in line, line
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=10)
        self.packets = read_pcap(self.path)

    def cleartext(self) -> list[Packet]:
        return [p for p in self.packets if p.proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP)]

    def esp_spis(self) -> set[int]:
        return {p.spi for p in self.packets if p.proto == 50}


def _transport(proto: int, data: bytes, off: int) -> tuple[int, int, int]:
    if proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) and off + 4 <= len(data):
        sport, dport = struct.unpack_from("!HH", data, off)
        return sport, dport, 0
    if proto == 50 and off + 4 <= len(data):
        return 0, 0, struct.unpack_from("!I", data, off)[0]
    return 0, 0, 0


def read_pcap(path: str) -> list[Packet]:
    """IP packets of an Ethernet pcap file (tcpdump -w). A fragment after the first (a SIP
    message larger than the link's MTU) carries no transport header: it gets the ports (or
    SPI) of its datagram's first fragment, by IP id, or 0 if that was not captured; reading
    its payload bytes as ports would invent packets between ports that never talked."""
    with open(path, "rb") as f:
        data = f.read()
    out: list[Packet] = []
    firsts: dict[tuple, tuple[int, int, int]] = {}
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("=I", data, off + 8)[0]
        pkt = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        ethertype = struct.unpack_from("!H", pkt, 12)[0]
        if ethertype == 0x0800:
            ihl = (pkt[14] & 15) * 4
            proto = pkt[14 + 9]
            src, dst = socket.inet_ntop(socket.AF_INET, pkt[26:30]), socket.inet_ntop(socket.AF_INET, pkt[30:34])
            frag = struct.unpack_from("!H", pkt, 20)[0]
            ident, offset, more = pkt[18:20], frag & 0x1FFF, bool(frag & 0x2000)
            transport = 14 + ihl
        elif ethertype == 0x86DD:
            proto = pkt[14 + 6]
            src = socket.inet_ntop(socket.AF_INET6, pkt[22:38])
            dst = socket.inet_ntop(socket.AF_INET6, pkt[38:54])
            transport, ident, offset, more = 54, b"", 0, False
            if proto == 44:  # a fragment header (the only extension header this rig sends)
                proto = pkt[54]
                frag = struct.unpack_from("!H", pkt, 56)[0]
                ident, offset, more = pkt[58:62], frag >> 3, bool(frag & 1)
                transport = 62
        else:
            continue
        key = (src, dst, proto, ident)
        if offset:
            ports = firsts.get(key, (0, 0, 0))
        else:
            ports = _transport(proto, pkt, transport)
            if more:
                firsts[key] = ports
        out.append(Packet(proto, src, dst, *ports))
    return out


CK = bytes.fromhex("00112233445566778899aabbccddeeff")
IK = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")


def tunnel_for(i: int, family: int, alg: str = "hmac-sha-1-96", ealg: str = "aes-cbc",
               **kw: object) -> Tunnel:
    """Tunnel number i: its own ports and SPIs, so tests never collide."""
    pc, ue = ADDRS[family]
    port, spi = 20000 + 8 * i, 0x10000 + 8 * i
    return Tunnel(pcscf=pc, ue=ue, port_pc=port, port_ps=port + 1, port_uc=port + 2,
                  port_us=port + 3, spi_pc=spi, spi_ps=spi + 1, spi_uc=spi + 2, spi_us=spi + 3,
                  alg=alg, ealg=ealg, ck=CK, ik=IK, **kw)


def spis(t: Tunnel) -> set[int]:
    return {t.spi_pc, t.spi_ps, t.spi_uc, t.spi_us}


def all_pairs_traffic(link: Link, t: Tunnel) -> None:
    """UDP both ways on both port pairs, and a TCP connection opened from each side."""
    pc, ue = link.pc, link.ue
    assert udp(ue, t.ue, t.port_uc, pc, t.pcscf, t.port_ps)
    assert udp(pc, t.pcscf, t.port_ps, ue, t.ue, t.port_uc)
    assert udp(pc, t.pcscf, t.port_pc, ue, t.ue, t.port_us)
    assert udp(ue, t.ue, t.port_us, pc, t.pcscf, t.port_pc)
    tcp(ue, t.ue, t.port_uc, pc, t.pcscf, t.port_ps)
    tcp(pc, t.pcscf, t.port_pc, ue, t.ue, t.port_us)
