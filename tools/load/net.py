"""The load rig's network: a P-CSCF namespace and a phones' namespace joined by one veth pair,
every phone an address of its own in one /16 on the phones' side.

Neighbour entries are static on both sides: with thousands of phone addresses the P-CSCF's
ARP table would pass the kernel's gc_thresh3 (1,024 by default), drop packets and make the
P-CSCF look slow; permanent entries are exempt from that limit (and from ARP traffic).
Everything is made with `ip` (one batch per namespace) and removed with the namespaces.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
from dataclasses import dataclass

from ipsec.xfrm.netns import entered

SUBNET = ipaddress.IPv4Network("10.90.0.0/16")
PC_MAC, UE_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
MAX_PHONES = 60000


def run(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:6])} ... failed: {done.stderr.strip()[:500]}")
    return done.stdout


@dataclass(frozen=True)
class Link:
    pc: str  # namespace names
    ue: str
    pcscf: str  # the P-CSCF's (and the S-CSCF stub's) address
    phones: tuple[str, ...]  # one address per phone


def phone_addresses(count: int) -> tuple[str, ...]:
    """10.90.0.1 is the P-CSCF; phones take 10.90.1.1 onwards."""
    base = int(SUBNET.network_address)
    return tuple(str(ipaddress.IPv4Address(base + 257 + i)) for i in range(count))


def make_link(tag: str, count: int) -> Link:
    """The two namespaces (named after `tag`, so runs never share them) and `count` phones."""
    if not 0 < count <= MAX_PHONES:
        raise ValueError(f"1..{MAX_PHONES} phones fit in {SUBNET}")
    link = Link(f"{tag}-pc", f"{tag}-ue", str(SUBNET.network_address + 1), phone_addresses(count))
    try:
        _build(link)
    except RuntimeError:
        drop_link(link)
        raise
    return link


def _build(link: Link) -> None:
    prefix = SUBNET.prefixlen
    for ns in (link.pc, link.ue):
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "link", "add", "veth-pc", "netns", link.pc, "address", PC_MAC, "type", "veth",
        "peer", "name", "veth-ue", "netns", link.ue, "address", UE_MAC)
    run("ip", "-n", link.pc, "-batch", "-", stdin="".join(
        [f"addr add {link.pcscf}/{prefix} dev veth-pc\n", "link set veth-pc up\n"]
        + [f"neigh replace {ip} lladdr {UE_MAC} dev veth-pc nud permanent\n" for ip in link.phones]))
    run("ip", "-n", link.ue, "-batch", "-", stdin="".join(
        [f"addr add {ip}/{prefix} dev veth-ue\n" for ip in link.phones]
        + ["link set veth-ue up\n",
           f"neigh replace {link.pcscf} lladdr {PC_MAC} dev veth-ue nud permanent\n"]))


def drop_link(link: Link) -> None:
    for ns in (link.pc, link.ue):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def flush_xfrm(link: Link) -> None:
    """No SA or policy left on either side: the relay is measured on a kernel without IPsec
    state, as a P-CSCF without IPsec would run."""
    for ns in (link.pc, link.ue):
        run("ip", "-n", ns, "xfrm", "policy", "flush")
        run("ip", "-n", ns, "xfrm", "state", "flush")


def udp_sockets(ns: str, endpoints: list[tuple[str, int]]) -> list[socket.socket]:
    """Bound UDP sockets in namespace `ns` (a socket keeps the namespace it was made in)."""
    with entered(ns):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in endpoints]
    for s, ep in zip(socks, endpoints):
        s.bind(ep)
    return socks


_STATE = re.compile(r"^src (\S+) dst (\S+)\s*\n\s*proto esp spi (0x[0-9a-f]+)", re.M)
_CURRENT = re.compile(r"lifetime current:\s*\n?\s*(\d+)\(bytes\), (\d+)\(packets\)")


def esp_counters(ns: str) -> dict[tuple[str, int], int]:
    """(destination, SPI) -> packets of every SA in the namespace, from `ip -s xfrm state`
    (iproute2's reading, not our netlink code)."""
    text = run("ip", "-n", ns, "-s", "xfrm", "state")
    out = {}
    for block in re.split(r"^(?=src )", text, flags=re.M):
        head, cur = _STATE.search(block), _CURRENT.search(block)
        if head and cur:
            out[(head.group(2), int(head.group(3), 16))] = int(cur.group(2))
    return out
