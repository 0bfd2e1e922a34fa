"""The rows of `list`, `show` and `stats`: plain functions from store records and kernel dumps
to JSON-ready dicts (the text output is rendered from the same dicts, so both always agree).

A stored tunnel names its 4 SAs and 4 policies exactly: `ipsec.tunnel` builds them from the
same values when the module installs them, so comparing the kernel's dump with what
`ipsec.tunnel` would install tells whether the kernel still holds that tunnel, whole and
unchanged. The comparison rules are `ipsec.reconcile`'s, the ones start-up acts on.
"""
from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ipsec.params import Params
from ipsec.reconcile import (SA_NAMES, _alg_names, expected, policy_differences,
                             sa_differences, spec_of)
from ipsec.sipuri import hostport, normalize_host
from ipsec.store import PENDING, REGISTERED, Contact, Lease, Tunnel
from ipsec.xfrm import SA, Dir, Policy, PolicyInfo, SAInfo, Selector

IN_USE, PENDING_ROLE, UNATTACHED = "in_use", "pending", "unattached"


# -- what the kernel holds ---------------------------------------------------------------------

def flow_of(direction: Dir | int, sel: Selector) -> tuple[int, str, str, int, int]:
    return (int(direction), sel.src, sel.dst, sel.sport, sel.dport)


@dataclass
class KernelView:
    """Our marker's SAs and policies as dumped, indexed the way the kernel finds them."""

    sas: dict[tuple[str, int], SAInfo] = field(default_factory=dict)
    policies: dict[tuple[int, str, str, int, int], list[PolicyInfo]] = field(default_factory=dict)
    sa_count: int = 0
    policy_count: int = 0

    @classmethod
    def of(cls, states: Iterable[SAInfo], policies: Iterable[PolicyInfo]) -> "KernelView":
        view = cls()
        for s in states:
            view.sas[(s.dst, s.spi)] = s
            view.sa_count += 1
        for p in policies:
            view.policies.setdefault(flow_of(p.dir, p.sel), []).append(p)
            view.policy_count += 1
        return view


def sa_row(name: str, want: SA, have: SAInfo | None) -> dict:
    """One SA of a tunnel: what we install, and the kernel's copy with its counters."""
    row = {"sa": name, "src": want.sel.src, "sport": want.sel.sport, "dst": want.sel.dst,
           "dport": want.sel.dport, "spi": want.spi, "reqid": want.reqid,
           **_alg_names(want), "present": have is not None,
           "differences": [] if have is None else sa_differences(want, have)}
    counters = ("packets", "bytes", "replay", "integrity_failed", "add_time", "use_time")
    for name_ in counters:
        row[name_] = None if have is None else getattr(have, name_)
    return row


def policy_row(name: str, want: Policy, found: list[PolicyInfo]) -> dict:
    """One policy of a tunnel; the kernel's copy is the one with the same direction and flow."""
    have = next((p for p in found if p.sel == want.sel), found[0] if found else None)
    return {"sa": name, "dir": want.dir.name.lower(), "src": want.sel.src,
            "sport": want.sel.sport, "dst": want.sel.dst, "dport": want.sel.dport,
            "reqid": want.tmpl.reqid, "present": have is not None,
            "differences": [] if have is None else policy_differences(want, have),
            "index": None if have is None else have.index,
            "add_time": None if have is None else have.add_time,
            "use_time": None if have is None else have.use_time}


def kernel_rows(t: Tunnel, view: KernelView, marker: int) -> tuple[list[dict], list[dict]]:
    sas, pols = expected(t, marker)
    return ([sa_row(n, sa, view.sas.get((sa.dst, sa.spi))) for n, sa in zip(SA_NAMES, sas)],
            [policy_row(n, p, view.policies.get(flow_of(p.dir, p.sel), []))
             for n, p in zip(SA_NAMES, pols)])


def kernel_summary(sa_rows: Sequence[dict], policy_rows: Sequence[dict]) -> dict:
    """`ok` when the kernel holds the tunnel's 4 SAs and 4 policies exactly as installed."""
    rows = [*sa_rows, *policy_rows]
    missing = [_piece(r) for r in rows if not r["present"]]
    differ = [f"{_piece(r)}: {'; '.join(r['differences'])}" for r in rows if r["differences"]]
    return {"ok": not missing and not differ,
            "sas": sum(r["present"] for r in sa_rows),
            "policies": sum(r["present"] for r in policy_rows),
            "missing": missing, "differs": differ}


def _piece(row: dict) -> str:
    kind = f"policy {row['dir']}" if "dir" in row else f"spi {row['spi']}"
    return (f"{row['sa']} {kind} {hostport(row['src'], row['sport'])} -> "
            f"{hostport(row['dst'], row['dport'])}")


# -- contacts and tunnels ----------------------------------------------------------------------

def tunnel_row(t: Tunnel, role: str, view: KernelView | None, marker: int,
               detail: bool = False) -> dict:
    """A stored tunnel: our lease, the phone's side, algorithms, and how the kernel holds it
    (None: the kernel was not asked)."""
    row = {"role": role, "pcscf": t.pcscf_host, "ue": t.ue.host,
           "spi_pc": t.lease.spi_pc, "spi_ps": t.lease.spi_ps,
           "port_pc": t.lease.port_pc, "port_ps": t.lease.port_ps,
           "spi_uc": t.ue.spi_uc, "spi_us": t.ue.spi_us,
           "port_uc": t.ue.port_uc, "port_us": t.ue.port_us,
           "alg": t.alg, "ealg": t.ealg, "kernel": None}
    if view is not None:
        sas, pols = kernel_rows(t, view, marker)
        row["kernel"] = kernel_summary(sas, pols)
        if detail:
            row["sas"], row["policies"] = sas, pols
    return row


def contact_row(c: Contact, now: float, view: KernelView | None, marker: int,
                detail: bool = False) -> dict:
    """A contact with its tunnel in use and its pending one (each None when absent)."""
    return {
        "id": c.id, "aor": c.aor, "uri": c.uri, "transport": c.transport,
        "received": _addr(c.received), "via": _addr(c.via),
        "state": c.state, "expires": c.expires, "expires_in": round(c.expires - now, 3),
        "tunnel": None if c.tunnel is None else tunnel_row(c.tunnel, IN_USE, view, marker, detail),
        "pending": (None if c.pending is None
                    else tunnel_row(c.pending, PENDING_ROLE, view, marker, detail)),
    }


def _addr(a) -> dict:
    return {"host": a.host, "port": a.port, "proto": a.proto}


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return False
    return True


def phone_query(text: str) -> dict[str, str]:
    """`show`/`drop` take an AoR (or contact URI) or an IP address: the store's filter."""
    text = text.strip()
    if is_ip(text):
        return {"host": normalize_host(text)}
    return {"aor": text}


def aor_candidates(aor: str) -> list[str]:
    """An AoR as typed, and with `sip:` when the operator left the scheme out."""
    return [aor] if ":" in aor.split("@")[0] else [aor, f"sip:{aor}"]


def list_view(contacts: Sequence[Contact], view: KernelView | None, marker: int,
              now: float) -> dict:
    return {"contacts": [contact_row(c, now, view, marker) for c in contacts]}


def show_view(contacts: Sequence[Contact], view: KernelView, marker: int, now: float) -> dict:
    return {"contacts": [contact_row(c, now, view, marker, detail=True) for c in contacts]}


# -- stats -------------------------------------------------------------------------------------

def roles(contacts: Iterable[Contact]) -> dict[int, str]:
    """spi_pc of every tunnel some contact uses -> in_use or pending (in use wins)."""
    out: dict[int, str] = {}
    for c in contacts:
        if c.pending is not None:
            out.setdefault(c.pending.lease.spi_pc, PENDING_ROLE)
        if c.tunnel is not None:
            out[c.tunnel.lease.spi_pc] = IN_USE
    return out


def stats_view(contacts: Sequence[Contact], leases: Sequence[tuple[Tunnel | Lease, float]],
               params: Params, view: KernelView | None, now: float) -> dict:
    """Contacts and tunnels by state, SPI pairs free and used, port pairs in use."""
    used = roles(contacts)
    tunnels = Counter()
    ports = Counter()
    for record, _ in leases:
        lease = record.lease if isinstance(record, Tunnel) else record
        ports[(lease.port_pc, lease.port_ps)] += 1
        if isinstance(record, Lease):
            tunnels["leased_only"] += 1
        else:
            tunnels[used.get(lease.spi_pc, UNATTACHED)] += 1
    pairs = params.ipsec_spi_id_range // 2
    states = Counter(c.state for c in contacts)
    configured = list(zip(params.client_ports, params.server_ports))
    known = set(configured)
    return {
        "contacts": {"total": len(contacts), PENDING: states[PENDING],
                     REGISTERED: states[REGISTERED],
                     "expired": sum(c.expires <= now for c in contacts)},
        "tunnels": {"total": sum(tunnels.values()), IN_USE: tunnels[IN_USE],
                    PENDING_ROLE: tunnels[PENDING_ROLE], UNATTACHED: tunnels[UNATTACHED],
                    "leased_only": tunnels["leased_only"]},
        "spi_pairs": {"first_spi": params.ipsec_spi_id_start, "total": pairs,
                      "used": len(leases), "free": max(pairs - len(leases), 0)},
        # pairs outside the configured ones (index None): the store has other parameters
        "port_pairs": [{"index": i, "port_pc": pc, "port_ps": ps, "tunnels": ports[(pc, ps)]}
                       for i, (pc, ps) in enumerate(configured)]
                      + [{"index": None, "port_pc": pc, "port_ps": ps, "tunnels": n}
                         for (pc, ps), n in sorted(ports.items()) if (pc, ps) not in known],
        "kernel": None if view is None else {"sas": view.sa_count,
                                             "policies": view.policy_count},
    }
