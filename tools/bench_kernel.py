"""Tunnels (4 SAs + 4 policies) installed and removed per second, three ways, one process.

    (a) ipsec.tunnel.install/remove, one tunnel at a time, as the module calls them;
    (b) the same netlink messages encoded beforehand, sent many per datagram over a raw
        netlink socket, every ACK read: what the kernel itself allows;
    (c) `ip -batch` with the same states and policies (iproute2 cannot set the selector's
        owner marker; everything else is equal).

Run where the kernel has ESP: `tools/with-esp .venv/bin/python -m tools.bench_kernel [N]`.
All three run in a fresh network namespace, so the host's tables are never touched. One
untimed round goes first: the kernel's first SAs load the crypto modules and grow the SA and
policy hash tables (which never shrink), a one-time cost that would otherwise land on
whichever method ran first (it made the first method look 5 times slower).
"""
from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from ipsec.algorithms import esp_algs
from ipsec.module import Module
from ipsec.params import Params
from ipsec.sipuri import Address
from ipsec.store import Store, UeLocks, UeSide
from ipsec.store import Tunnel as StoredTunnel
from ipsec.tunnel import Tunnel, install, policies, remove, sas
from ipsec.xfrm import PolicyId, SAId, Xfrm, del_policy, del_sa, new_policy, new_sa
from ipsec.xfrm import codec
from ipsec.xfrm import structs as k
from ipsec.xfrm.netns import entered

NETNS = "bench-kernel"
CK = bytes(range(16))
IK = bytes(range(16, 32))
ALGS = esp_algs("hmac-sha-1-96", "aes-cbc", CK, IK)
PER_DATAGRAM = 64


def tunnel(i: int) -> Tunnel:
    return Tunnel(pcscf="10.60.0.1", ue=f"10.61.{i // 250}.{i % 250 + 1}",
                  port_pc=5100, port_ps=5101, port_uc=6100, port_us=6101,
                  spi_pc=0x100000 + 2 * i, spi_ps=0x100001 + 2 * i, spi_uc=0x3000,
                  spi_us=0x3001, alg="hmac-sha-1-96", ealg="aes-cbc", ck=CK, ik=IK)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_layer(x: Xfrm, tunnels: list[Tunnel]) -> tuple[float, float]:
    def add() -> None:
        for t in tunnels:
            install(x, t)

    def rm() -> None:
        for t in tunnels:
            remove(x, t)

    return timed(add), timed(rm)


def _encoded(tunnels: list[Tunnel]) -> tuple[list[codec.Request], list[codec.Request]]:
    adds: list[codec.Request] = []
    dels: list[codec.Request] = []
    for t in tunnels:
        adds += [new_sa(sa) for sa in sas(t, ALGS)] + [new_policy(p) for p in policies(t)]
        dels += [del_policy(PolicyId(p.dir, p.sel)) for p in policies(t)]
        dels += [del_sa(SAId(sa.dst, sa.spi)) for sa in sas(t, ALGS)]
    return adds, dels


def _datagrams(requests: list[codec.Request], first_seq: int) -> list[tuple[bytes, int]]:
    out = []
    for start in range(0, len(requests), PER_DATAGRAM):
        chunk = requests[start : start + PER_DATAGRAM]
        data = b"".join(
            codec.HDR.pack(16 + len(r.body), r.type, r.flags, first_seq + start + i, 0) + r.body
            for i, r in enumerate(chunk)
        )
        out.append((data, len(chunk)))
    return out


def _send_all(sock: socket.socket, datagrams: list[tuple[bytes, int]]) -> None:
    buf = bytearray(65536)
    for data, count in datagrams:
        sock.send(data)
        while count:
            n = sock.recv_into(buf)
            off = 0
            while off < n:
                length, mtype = codec.HDR.unpack_from(buf, off)[:2]
                if mtype == k.NLMSG_ERROR:
                    if int.from_bytes(buf[off + 16 : off + 20], "little", signed=True):
                        raise RuntimeError("the kernel refused a pre-encoded request")
                    count -= 1
                off += (length + 3) & ~3


def bench_raw(tunnels: list[Tunnel]) -> tuple[float, float]:
    adds, dels = _encoded(tunnels)
    add_dgrams, del_dgrams = _datagrams(adds, 1), _datagrams(dels, 1 + len(adds))
    with entered(NETNS):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, k.NETLINK_XFRM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, 0))
    with sock:
        return timed(lambda: _send_all(sock, add_dgrams)), timed(lambda: _send_all(sock, del_dgrams))


def _ip_lines(tunnels: list[Tunnel]) -> tuple[str, str]:
    adds, dels = [], []
    auth = f"auth-trunc 'hmac(sha1)' 0x{IK.hex()}00000000 96 enc 'cbc(aes)' 0x{CK.hex()}"
    for t in tunnels:
        for sa, p in zip(sas(t, ALGS), policies(t)):
            sel = f"src {sa.src} dst {sa.dst} proto 0 sport {sa.sel.sport} dport {sa.sel.dport}"
            adds.append(f"xfrm state add src {sa.src} dst {sa.dst} proto esp spi {sa.spi} "
                        f"reqid {sa.reqid} mode transport replay-window 32 {auth} sel {sel}")
            adds.append(f"xfrm policy add {sel} dir {p.dir.name.lower()} tmpl src {sa.src} "
                        f"dst {sa.dst} proto esp reqid {sa.reqid} mode transport")
            dels.append(f"xfrm policy delete {sel} dir {p.dir.name.lower()}")
            dels.append(f"xfrm state delete src {sa.src} dst {sa.dst} proto esp spi {sa.spi}")
    return "\n".join(adds) + "\n", "\n".join(dels) + "\n"


def bench_ip(tunnels: list[Tunnel]) -> tuple[float, float]:
    adds, dels = _ip_lines(tunnels)
    times = []
    for text in (adds, dels):
        with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
            f.write(text)
            f.flush()
            times.append(timed(lambda: subprocess.run(
                ["ip", "-n", NETNS, "-batch", f.name], check=True)))
    return times[0], times[1]


class _Quiet:
    def info(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
    def err(self, text: str) -> None:
        print(text, end="", file=sys.stderr)


def bench_sweep(x: Xfrm, tunnels: list[Tunnel]) -> float:
    """(d) The module's expiry sweep: every registration expired at once (a mass expiry
    after an outage), kernel and store cleaned up by one `Module.sweep()`."""
    with tempfile.TemporaryDirectory() as d:
        params = Params(ipsec_listen_addr="10.60.0.1", ipsec_spi_id_start=0x100000,
                        ipsec_spi_id_range=4 * len(tunnels))
        store = Store(f"{d}/bench.sqlite", spi_start=params.ipsec_spi_id_start,
                      spi_range=params.ipsec_spi_id_range, client_port=5100,
                      server_port=5101, max_connections=1)
        module = Module(params, store, x, _Quiet(), UeLocks(f"{d}/bench.lock"), expiry_grace=0.0)
        for t in tunnels:
            c = store.save_pending(f"sip:{t.ue}@ims", f"sip:u@{t.ue}:{t.port_us}",
                                   Address(t.ue, 5060), Address(t.ue, 5060))
            lease = store.lease(t.ue)
            t = dataclasses.replace(t, spi_pc=lease.spi_pc, spi_ps=lease.spi_ps)
            install(x, t)
            store.set_tunnel(c.id, StoredTunnel(lease, UeSide(t.ue, t.spi_uc, t.spi_us, t.port_uc,
                                                              t.port_us), t.alg, t.ealg, t.pcscf,
                                                b"", "", ""))
            store.set_registered(c.id, 0.0)
        took = timed(module.sweep)
        assert x.count_states() == 0 and x.count_policies() == 0 and not store.live_tunnels()
        store.close()
    return took


def report(name: str, n: int, t_add: float, t_rm: float) -> float:
    both = n / (t_add + t_rm)
    print(f"{name:<42} {n / t_add:>9.0f} {n / t_rm:>9.0f} {both:>9.0f}")
    return both


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    tunnels = [tunnel(i) for i in range(n)]
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        x = Xfrm(netns=NETNS)
        bench_raw(tunnels)  # warm-up, untimed: see the module's docstring
        layer = bench_layer(x, tunnels)
        raw = bench_raw(tunnels)
        ip = bench_ip(tunnels)
        assert x.count_states() == 0 and x.count_policies() == 0
        sweep = bench_sweep(x, tunnels)
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=True)
    print(f"{n} tunnels (4 SAs + 4 policies each), tunnels per second:")
    print(f"{'':<42} {'install':>9} {'remove':>9} {'both':>9}")
    a = report("(a) ipsec.tunnel install/remove", n, *layer)
    b = report(f"(b) pre-encoded, {PER_DATAGRAM} msgs/datagram, raw socket", n, *raw)
    c = report("(c) ip -batch", n, *ip)
    print(f"a/b = {a / b:.2f}   a/c = {a / c:.1f}")
    print(f"(d) Module.sweep of {n} expired registrations: {sweep:.2f} s ({n / sweep:.0f}/s)")


if __name__ == "__main__":
    main()
