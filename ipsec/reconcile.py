"""Start-up reconciliation: the store's live tunnels against the kernel's dump of our marker.

A live tunnel is kept only when the kernel holds all 8 of its pieces exactly as the module
installs them: 4 SAs (source, selector with marker, reqid, transport mode, algorithms) and 4
policies (selector, direction, action allow, priority, one template: ESP, transport, the
SA's addresses and reqid). Anything missing or different drops the tunnel: keys are never
stored, so it cannot be rebuilt, and a tunnel without its policies would let the kernel send
to the phone in clear and accept cleartext from it. Everything of ours that no kept tunnel
explains is a stray, removed by its own identity (SAs by destination and SPI, policies by
index), so removing a dropped tunnel never takes a piece a kept tunnel holds on the same flow.

Pure functions over store records and dumps; `apply` is the one step that talks to the kernel.
The comparison rules are shared with the operator's command line (`ims-ipsec list/doctor`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ipsec import tunnel as kernel
from ipsec.algorithms import esp_algs
from ipsec.store import Tunnel
from ipsec.xfrm import SA, Policy, PolicyId, PolicyInfo, SAId, SAInfo, Xfrm, XfrmNotFound
from ipsec.xfrm.codec import del_policy, del_sa
from ipsec.xfrm.structs import XFRM_MODE_TRANSPORT

SA_NAMES = ("SA1", "SA2", "SA3", "SA4")  # 33.203 7.1 order: uc->ps, ps->uc, pc->us, us->pc


def spec_of(t: Tunnel, marker: int) -> kernel.Tunnel:
    """The kernel identity of a stored tunnel (keys are not stored and not needed)."""
    return kernel.Tunnel(t.pcscf_host, t.ue.host, t.lease.port_pc, t.lease.port_ps,
                         t.ue.port_uc, t.ue.port_us, t.lease.spi_pc, t.lease.spi_ps,
                         t.ue.spi_uc, t.ue.spi_us, t.alg, t.ealg, bytes(16), bytes(16), marker)


def expected(t: Tunnel, marker: int) -> tuple[list[SA], list[Policy]]:
    """SA1..SA4 and their policies, as the module installs them for this tunnel."""
    spec = spec_of(t, marker)
    return kernel.sas(spec, esp_algs(t.alg, t.ealg, bytes(16), bytes(16))), kernel.policies(spec)


def _alg_names(sa: SA) -> dict[str, str | None]:
    a = sa.algs
    return {"auth": a.auth and a.auth.name, "crypt": a.crypt and a.crypt.name,
            "aead": a.aead and a.aead.name}


def sa_differences(want: SA, have: SAInfo) -> list[str]:
    """How an SA found under the wanted (destination, SPI) differs from what we install."""
    diffs = []
    if have.src != want.src:
        diffs.append(f"source {have.src}, expected {want.src}")
    if have.sel != want.sel:
        diffs.append(f"selector {have.sel} (marker {have.sel.user:#x}), expected {want.sel}")
    if have.reqid != want.reqid:
        diffs.append(f"reqid {have.reqid}, expected {want.reqid}")
    if have.mode != XFRM_MODE_TRANSPORT:
        diffs.append(f"mode {have.mode}, expected transport")
    names = _alg_names(want)
    for kind in ("auth", "crypt", "aead"):
        if getattr(have, kind) != names[kind]:
            diffs.append(f"{kind} {getattr(have, kind)}, expected {names[kind]}")
    return diffs


def policy_differences(want: Policy, have: PolicyInfo) -> list[str]:
    """How a policy found on the wanted flow and direction differs from what we install."""
    diffs = []
    if have.sel != want.sel:
        diffs.append(f"selector {have.sel}, expected {want.sel}")
    if have.action != 0:
        diffs.append("action block, expected allow")
    if have.priority != want.priority:
        diffs.append(f"priority {have.priority}, expected {want.priority}")
    tmpl = [(t.src, t.dst, t.reqid, t.proto, t.mode) for t in have.templates]
    w = want.tmpl
    if tmpl != [(w.src, w.dst, w.reqid, w.proto, w.mode)]:
        diffs.append(f"template(s) {tmpl or 'none'}, expected reqid {w.reqid} {w.src} -> {w.dst}")
    return diffs


def policy_is(want: Policy, have: PolicyInfo) -> bool:
    """Is this kernel policy exactly the one we install (and not another tunnel's on the
    same flow, whose template names other SAs)?"""
    return not policy_differences(want, have)


@dataclass
class Plan:
    """What start-up does: keep these tunnels, drop those (with what is wrong with each, for
    the log), and remove the strays of ours no kept tunnel explains."""

    kept: list[Tunnel] = field(default_factory=list)
    dropped: list[tuple[Tunnel, list[str]]] = field(default_factory=list)
    stray_sas: list[SAId] = field(default_factory=list)
    stray_policies: list[PolicyId] = field(default_factory=list)


def problems(t: Tunnel, sas: dict[tuple[str, int], SAInfo],
             policies: dict[tuple, PolicyInfo], marker: int) -> list[str]:
    """What the kernel lacks or holds differently of one tunnel (empty: whole and exact)."""
    want_sas, want_pols = expected(t, marker)
    found = []
    for name, want in zip(SA_NAMES, want_sas):
        have = sas.get((want.dst, want.spi))
        if have is None:
            found.append(f"{name} spi {want.spi} missing")
        else:
            found += [f"{name} spi {want.spi}: {d}" for d in sa_differences(want, have)]
    for name, want in zip(SA_NAMES, want_pols):
        have = policies.get((int(want.dir), want.sel))
        if have is None:
            found.append(f"{name} policy {want.dir.name.lower()} missing")
        else:
            found += [f"{name} policy {want.dir.name.lower()}: {d}"
                      for d in policy_differences(want, have)]
    return found


def plan(live: Sequence[Tunnel], states: Sequence[SAInfo], policies: Sequence[PolicyInfo],
         marker: int) -> Plan:
    """Decide over complete dumps of our marker (a partial dump must never get here: what
    it lacks would look missing and drop live tunnels)."""
    sas = {(s.dst, s.spi): s for s in states}
    pols = {(int(p.dir), p.sel): p for p in policies}
    out = Plan()
    explained_sas: set[tuple[str, int]] = set()
    explained_pols: set[int] = set()
    for t in live:
        wrong = problems(t, sas, pols, marker)
        if wrong:
            out.dropped.append((t, wrong))
            continue
        out.kept.append(t)
        want_sas, want_pols = expected(t, marker)
        explained_sas |= {(sa.dst, sa.spi) for sa in want_sas}
        explained_pols |= {pols[(int(p.dir), p.sel)].index for p in want_pols}
    out.stray_sas = [s.id for key, s in sas.items() if key not in explained_sas]
    out.stray_policies = [p.id for p in policies if p.index not in explained_pols]
    return out


def apply(x: Xfrm, p: Plan) -> None:
    """Remove the strays: policies first (by index), then SAs. "Not found" is fine (gone
    meanwhile); any other refusal is raised after all were tried."""
    results = x.batch([del_policy(pid) for pid in p.stray_policies] +
                      [del_sa(sid) for sid in p.stray_sas])
    for r in results:
        if r is not None and not isinstance(r, XfrmNotFound):
            raise r
