"""What `ims-ipsec doctor` concludes, each finding with what to do about it. No I/O here:
`commands` gathers the store's records, the kernel's dumps, /proc/net and the ESP probe's
answers, and these functions judge them.

Drift is judged in both directions: a tunnel the store holds as live whose SAs or policies
the kernel lacks (or holds differently), and kernel entries with our marker that no tunnel
of the store explains. On a live P-CSCF a tunnel being installed or removed looks like drift
for a moment, so `commands` looks twice and keeps what `confirmed` finds both times.
"""
from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from ipsec.algorithms import VALID_PAIRS, esp_algs
from ipsec.module import STALE_LEASE_AGE
from ipsec.params import Params
from ipsec.sipuri import hostport, normalize_host
from ipsec.store import Contact, Lease, Tunnel
from ipsec.xfrm import Dir

from . import views

OK, WARNING, PROBLEM = "ok", "warning", "problem"
SWEEP_SLACK = 10.0  # seconds past its due time before a leftover means the sweep is not running
STORE_SCHEMA = 2

# kernel crypto name -> (module to load, kernel options that provide it)
CRYPTO = {
    "hmac(md5)": ("md5", "CONFIG_CRYPTO_MD5"),
    "hmac(sha1)": ("sha1", "CONFIG_CRYPTO_SHA1"),
    "cbc(aes)": ("aes", "CONFIG_CRYPTO_AES + CONFIG_CRYPTO_CBC"),
    "cbc(des3_ede)": ("des3_ede", "CONFIG_CRYPTO_DES + CONFIG_CRYPTO_CBC"),
    "ecb(cipher_null)": ("crypto_null", "CONFIG_CRYPTO_NULL"),
    "rfc4106(gcm(aes))": ("gcm", "CONFIG_CRYPTO_GCM"),
    "rfc4543(gcm(aes))": ("gcm", "CONFIG_CRYPTO_GCM"),
}


@dataclass(frozen=True)
class Finding:
    """One conclusion: `check` names the area, `fix` says what to do (empty when ok)."""

    check: str
    severity: str
    what: str
    fix: str = ""
    key: str = ""  # the same problem seen twice has the same key (drift is looked at twice)

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["key"]
        return d


# -- parameters ----------------------------------------------------------------------------------

def param_findings(params: Params) -> list[Finding]:
    return [Finding("params", WARNING, w, "change the define in kamailio.cfg (or -A) if the "
                    "warning applies to this deployment") for w in params.warnings()]


# -- ESP and the algorithms -------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """The kernel's answer to adding a throwaway SA of one algorithm pair (error None: added)."""

    family: int  # 4 or 6
    alg: str
    ealg: str
    error: int | None = None
    message: str = ""
    detail: str = ""  # the kernel's extended-ack text, e.g. "Requested CRYPT algorithm not found"


def probe_pairs() -> list[tuple[str, str]]:
    return sorted(VALID_PAIRS)


def _missing_crypto(p: Probe) -> list[str]:
    algs = esp_algs(p.alg, p.ealg, bytes(16), bytes(16))
    named = {"AUTH": algs.auth, "CRYPT": algs.crypt, "AEAD": algs.aead}
    blamed = [a.name for kind, a in named.items() if a is not None and kind in p.detail.upper()]
    return blamed or [a.name for a in named.values() if a is not None]


def esp_findings(probes: Sequence[Probe]) -> list[Finding]:
    """No ESP at all (per family), or which algorithm pairs the kernel cannot install."""
    out: list[Finding] = []
    families = sorted({p.family for p in probes})
    for fam in families:
        mine = [p for p in probes if p.family == fam]
        no_esp = [p for p in mine if p.error == errno.EPROTONOSUPPORT]
        if no_esp:
            module = "esp4" if fam == 4 else "esp6"
            option = "CONFIG_INET_ESP" if fam == 4 else "CONFIG_INET6_ESP"
            out.append(Finding(
                "esp", PROBLEM, f"this kernel cannot hold IPv{fam} ESP SAs ({no_esp[0].message})",
                f"load {module} (modprobe {module}) or run a kernel built with {option} and "
                "CONFIG_XFRM_USER; until then no phone can be protected", key=f"esp{fam}"))
            continue
        failed = [p for p in mine if p.error is not None]
        for p in failed:
            crypto = _missing_crypto(p)
            mods = sorted({CRYPTO[c][0] for c in crypto if c in CRYPTO})
            opts = sorted({CRYPTO[c][1] for c in crypto if c in CRYPTO})
            out.append(Finding(
                "algorithms", PROBLEM,
                f"IPv{fam}: alg={p.alg} ealg={p.ealg} cannot be installed ({p.message}); "
                f"needs kernel crypto {', '.join(crypto)}",
                f"modprobe {' '.join(mods)} (or a kernel with {', '.join(opts)}); meanwhile a "
                "phone choosing this pair gets a 503",
                key=f"alg{fam} {p.alg} {p.ealg}"))
        if not failed:
            out.append(Finding("esp", OK, f"IPv{fam} ESP works with all {len(mine)} "
                               "algorithm pairs a phone may choose", key=f"esp{fam}"))
    return out


def has_no_esp(findings: Iterable[Finding]) -> bool:
    return any(f.check == "esp" and f.severity == PROBLEM for f in findings)


# -- listen sockets ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Socket:
    proto: str  # udp or tcp
    host: str
    port: int
    role: str = ""

    def __str__(self) -> str:
        return f"{self.proto} {hostport(self.host, self.port)}"


def expected_sockets(params: Params, sip_addrs: Sequence[str], sip_port: int,
                     core: tuple[str, int] | None = None) -> list[Socket]:
    """Every socket kamailio.cfg binds from these defines: 5060 on PCSCF_IP(6), the core
    socket (CORE_IP:CORE_PORT) when there is one, and each protected client and server port
    on IPSEC_LISTEN_ADDR(6), UDP and TCP."""
    out = []
    for host in map(normalize_host, sip_addrs):
        out += [Socket(proto, host, sip_port, "unprotected SIP") for proto in ("udp", "tcp")]
    if core is not None:
        out += [Socket(proto, normalize_host(core[0]), core[1], "core socket")
                for proto in ("udp", "tcp")]
    addrs = [normalize_host(a) for a in (params.ipsec_listen_addr, params.ipsec_listen_addr6) if a]
    for host in addrs:
        for ports, role in ((params.client_ports, "protected client port"),
                            (params.server_ports, "protected server port")):
            for port in ports:
                for proto in ("udp", "tcp"):
                    s = Socket(proto, host, port, role)
                    if not any((o.proto, o.host, o.port) == (proto, host, port) for o in out):
                        out.append(s)
    return out


TCP_LISTEN = "0A"


def parse_proc_net(text: str, proto: str) -> set[tuple[str, str, int]]:
    """(proto, host, port) of each bound socket in /proc/net/{udp,udp6,tcp,tcp6} (TCP: only
    listening ones). Addresses are printed as 32-bit words in the host's byte order."""
    found = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        if proto == "tcp" and fields[3] != TCP_LISTEN:
            continue
        hexaddr, _, hexport = fields[1].partition(":")
        raw = b"".join(struct.pack("=I", int(hexaddr[i:i + 8], 16))
                       for i in range(0, len(hexaddr), 8))
        found.add((proto, ipaddress.ip_address(raw).compressed, int(hexport, 16)))
    return found


def _bound(s: Socket, bound: set[tuple[str, str, int]]) -> bool:
    wildcard = "::" if ":" in s.host else "0.0.0.0"
    return any((s.proto, h, s.port) in bound for h in (s.host, wildcard))


def listen_findings(expected: Sequence[Socket], bound: set[tuple[str, str, int]],
                    netns: str | None) -> list[Finding]:
    missing = [s for s in expected if not _bound(s, bound)]
    where = f"network namespace {netns}" if netns else "this network namespace"
    if missing and len(missing) == len(expected):
        return [Finding("listen", PROBLEM,
                        f"none of the {len(expected)} sockets of this P-CSCF is bound in {where}",
                        "start Kamailio; if it runs, it uses other defines than given here "
                        "(--define/--cfg) or lives in another namespace (--netns)", key="listen")]
    out = [Finding("listen", PROBLEM, f"{s} ({s.role}) is not bound",
                   "Kamailio binds the protected ports through ims_ipsec_pcscf's modparams from "
                   "the same defines: restart it with the defines given here and look in its log "
                   "for a bind error (address missing on the host, port taken)",
                   key=f"listen {s}") for s in missing]
    if not missing:
        out.append(Finding("listen", OK, f"all {len(expected)} sockets are bound ("
                           f"{', '.join(sorted({s.role for s in expected}))})", key="listen"))
    return out


# -- the store ---------------------------------------------------------------------------------

def store_findings(path: str, mode: int, health: dict, contacts: int, leases: int) -> list[Finding]:
    out = []
    check = health.get("quick_check") or []
    if check != ["ok"]:
        out.append(Finding("store", PROBLEM, f"{path} is damaged: {'; '.join(check[:5])}",
                           "stop Kamailio, move the file (and its -wal/-shm) aside and start "
                           "again: phones register again (sqlite3 FILE .recover may save it)",
                           key="store damaged"))
    if health.get("journal_mode") != "wal":
        out.append(Finding("store", PROBLEM,
                           f"{path} is in journal mode {health.get('journal_mode')!r}, not WAL",
                           "restart Kamailio (it switches the file to WAL when it opens it)",
                           key="store wal"))
    if mode & 0o077:
        out.append(Finding("store", WARNING,
                           f"{path} has mode {mode & 0o777:04o}: it tells who is registered from "
                           "where", f"chmod 600 {path}", key="store mode"))
    if not out:
        out.append(Finding("store", OK, f"{path}: schema {health.get('schema_version')}, WAL, "
                           f"intact; {contacts} contact(s), {leases} lease(s)", key="store"))
    return out


# -- drift between the store and the kernel ----------------------------------------------------

def _ip(netns: str | None) -> str:
    return f"ip -n {netns}" if netns else "ip"


def drift_findings(contacts: Sequence[Contact], leases: Sequence[tuple[Tunnel | Lease, float]],
                   view: views.KernelView, *, params: Params, marker: int, now: float,
                   grace: float, netns: str | None) -> list[Finding]:
    """Every way the store and the kernel disagree, and leftovers the sweep should have taken."""
    out: list[Finding] = []
    used = views.roles(contacts)
    owners: dict[int, Contact] = {}
    for c in contacts:
        for t in (c.pending, c.tunnel):
            if t is not None:
                owners[t.lease.spi_pc] = c
    explained_sas: set[tuple[str, int]] = set()
    explained_pols: set[tuple] = set()
    live = 0
    for record, leased_at in leases:
        if isinstance(record, Lease):
            if now - leased_at > STALE_LEASE_AGE + SWEEP_SLACK:
                out.append(_leftover(f"lease spi-c={record.spi_pc} (no tunnel staged on it)",
                                     now - leased_at, f"lease {record.spi_pc}"))
            continue
        sas, pols = views.expected(record, marker)
        explained_sas |= {(sa.dst, sa.spi) for sa in sas}
        explained_pols |= {views.flow_of(p.dir, p.sel) for p in pols}
        role = used.get(record.lease.spi_pc)
        if role is None:
            if now - leased_at > STALE_LEASE_AGE + SWEEP_SLACK:
                out.append(_leftover(f"tunnel spi-c={record.lease.spi_pc} of {record.ue.host} "
                                     "(no contact uses it)", now - leased_at,
                                     f"lease {record.lease.spi_pc}"))
            continue
        live += 1
        summary = views.kernel_summary(*views.kernel_rows(record, view, marker))
        if not summary["ok"]:
            out.append(_broken_tunnel(owners[record.lease.spi_pc], record, role, summary))
    out += _strays(view, explained_sas, explained_pols, netns)
    out += _expired(contacts, now, grace)
    out += _outside_parameters(leases, params)
    out.append(Finding("drift", OK, f"store and kernel agree: {live} live tunnel(s), "
                       f"{view.sa_count} SA(s) and {view.policy_count} policy(ies) with our "
                       "marker", key="drift"))
    return _drift_ok_only_alone(out)


def _drift_ok_only_alone(findings: list[Finding]) -> list[Finding]:
    """The "agree" line stays only when no drift problem was found."""
    if any(f.check == "drift" and f.severity != OK for f in findings):
        return [f for f in findings if not (f.check == "drift" and f.severity == OK)]
    return findings


def _broken_tunnel(c: Contact, t: Tunnel, role: str, summary: dict) -> Finding:
    parts = []
    if summary["missing"]:
        parts.append("missing from the kernel: " + ", ".join(summary["missing"]))
    if summary["differs"]:
        parts.append("different in the kernel: " + " | ".join(summary["differs"]))
    title = "tunnel in use" if role == views.IN_USE else "pending tunnel"
    what = (f"contact {c.id} {c.aor} ({t.ue.host}): {title} spi-c={t.lease.spi_pc}: "
            + "; ".join(parts))
    fix = (f"ims-ipsec drop --id {c.id} removes the rest of it and the contact; the phone registers "
           "again (keys are never stored, so its SAs cannot be rebuilt). A Kamailio restart "
           "does the same for every such tunnel")
    return Finding("drift", PROBLEM, what, fix, key=f"tunnel {t.lease.spi_pc}")


def _leftover(what: str, age: float, key: str) -> Finding:
    return Finding("sweep", WARNING, f"{what}, leased {age:.0f} s ago: the sweep removes such "
                   f"leftovers after {STALE_LEASE_AGE:.0f} s",
                   "check that Kamailio's rtimer calls the sweep (kamailio.cfg) and look for "
                   "'ims-ipsec: sweep:' errors in its log", key=key)


def _strays(view: views.KernelView, sas: set, pols: set, netns: str | None) -> list[Finding]:
    out = []
    ip = _ip(netns)
    restart = "; a Kamailio restart removes every entry of ours that no live tunnel explains"
    for (dst, spi), s in sorted(view.sas.items()):
        if (dst, spi) not in sas:
            out.append(Finding(
                "drift", PROBLEM,
                f"SA spi {spi} ({spi:#x}) {s.src} -> {dst} (selector {s.sel}) carries our marker "
                "but no tunnel in the store explains it",
                f"{ip} xfrm state delete src {s.src} dst {dst} proto esp spi {spi:#x}{restart}",
                key=f"stray sa {dst} {spi}"))
    for flow, found in sorted(view.policies.items()):
        if flow in pols:
            continue
        for p in found:
            out.append(Finding(
                "drift", PROBLEM,
                f"policy {Dir(p.dir).name.lower()} {p.sel} (index {p.index}) carries our marker "
                "but no tunnel in the store explains it",
                f"{ip} xfrm policy delete index {p.index} dir {Dir(p.dir).name.lower()}{restart}",
                key=f"stray policy {p.index}"))
    return out


def _expired(contacts: Sequence[Contact], now: float, grace: float) -> list[Finding]:
    late = [c for c in contacts
            if c.expires + (grace if c.state == "registered" else 0) + SWEEP_SLACK < now]
    if not late:
        return []
    return [Finding("sweep", WARNING,
                    f"{len(late)} contact(s) past their expiry are still stored (oldest: contact "
                    f"{late[0].id} {late[0].aor}, {now - late[0].expires:.0f} s ago)",
                    "the sweep (rtimer, every second) is not running or failing: check "
                    "kamailio.cfg's rtimer and 'ims-ipsec: sweep:' lines in Kamailio's log",
                    key="expired")]


def _outside_parameters(leases: Sequence[tuple[Tunnel | Lease, float]],
                        params: Params) -> list[Finding]:
    spis = range(params.ipsec_spi_id_start, params.ipsec_spi_id_start + params.ipsec_spi_id_range)
    pairs = set(zip(params.client_ports, params.server_ports))
    odd = 0
    for record, _ in leases:
        lease = record.lease if isinstance(record, Tunnel) else record
        if lease.spi_pc not in spis or (lease.port_pc, lease.port_ps) not in pairs:
            odd += 1
    if not odd:
        return []
    return [Finding("params", WARNING,
                    f"{odd} lease(s) in the store use SPIs or ports outside the parameters given "
                    "here", "pass the defines the P-CSCF runs with (--define NAME=VALUE or "
                    "--cfg kamailio.cfg); if the P-CSCF itself changed them, its tunnels from "
                    "before stay until they expire", key="outside")]


def confirmed(first: Sequence[Finding], second: Sequence[Finding]) -> list[Finding]:
    """Drift seen in both looks (a tunnel being installed or removed is seen only once)."""
    keys = {f.key for f in first if f.severity != OK}
    kept = [f for f in second if f.severity == OK or f.check != "drift" or f.key in keys]
    if len(kept) < len(second) and not any(f.check == "drift" for f in kept):
        kept.append(Finding("drift", OK, "store and kernel agree (what differed was a tunnel "
                            "being installed or removed)", key="drift"))
    return kept


def worst(findings: Iterable[Finding]) -> str:
    severities = {f.severity for f in findings}
    return PROBLEM if PROBLEM in severities else WARNING if WARNING in severities else OK
