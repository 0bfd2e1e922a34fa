"""One UE's IPsec tunnel: 4 SAs + 4 policies (3GPP TS 33.203 7.1), installed all or nothing.

The SPI of an SA is always chosen by its receiver:

    SA1  UE port_uc     -> P-CSCF port_ps  spi_ps   policy in
    SA2  P-CSCF port_ps -> UE port_uc      spi_uc   policy out
    SA3  P-CSCF port_pc -> UE port_us      spi_us   policy out
    SA4  UE port_us     -> P-CSCF port_pc  spi_pc   policy in

Selectors match both UDP and TCP (protocol any) with exact addresses and ports, so a TCP
connection opened on a pair is protected both ways by that pair's two SAs. These four pairs
are all a P-CSCF uses: the C module's 4 extra "in-dialog" policies reuse these SAs' SPIs, so
their SAs can never exist (the kernel keys SAs by destination and SPI) and their policies
only make the kernel drop the packets they match (tests/kernel/test_tunnel.py shows it). We
install none: every policy has its SA.

reqid: each SA's reqid is its own SPI, and its policy's template asks for exactly that reqid.
The kernel picks an outbound SA by (addresses, protocol, mode, reqid), so equal reqids would
let a UE's second tunnel (other ports, other SPIs) match the first tunnel's SAs. An SPI is
unique per destination (the kernel refuses duplicates), so (destination, reqid) is too, and it
is never 0 (a template's reqid 0 would mean "any SA").

MARKER: every selector carries `user` = 0x50435343 (ASCII "PCSC"), so startup and shutdown
find and flush exactly our entries. It differs from the C module's 143956232 on purpose: the
two modules can share a host during a migration without flushing each other's tunnels.
"""
from __future__ import annotations

import errno
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ipsec import lifetimes
from ipsec.algorithms import EspAlgs, esp_algs
from ipsec.xfrm import (
    SA,
    Dir,
    Lifetime,
    Policy,
    PolicyId,
    PolicyInfo,
    Request,
    SAId,
    Selector,
    Template,
    Xfrm,
    XfrmError,
    XfrmNotFound,
    codec,
    del_policy,
    del_sa,
    new_policy,
    update_policy,
    update_sa,
)

MARKER = 0x50435343
PRIORITY = 0  # Linux tries policies in increasing priority order: exact UE flows first


@dataclass(frozen=True, slots=True)
class Tunnel:
    """Everything the kernel needs for one UE, as plain values (keys hidden from repr)."""

    pcscf: str
    ue: str
    port_pc: int
    port_ps: int
    port_uc: int
    port_us: int
    spi_pc: int
    spi_ps: int
    spi_uc: int
    spi_us: int
    alg: str
    ealg: str
    ck: bytes = field(repr=False)
    ik: bytes = field(repr=False)
    marker: int = MARKER
    lifetime: Lifetime | None = None


def _flows(t: Tunnel) -> list[tuple[str, int, str, int, int, Dir]]:
    """(src, sport, dst, dport, spi, policy direction) of SA1..SA4, in that order."""
    return [
        (t.ue, t.port_uc, t.pcscf, t.port_ps, t.spi_ps, Dir.IN),
        (t.pcscf, t.port_ps, t.ue, t.port_uc, t.spi_uc, Dir.OUT),
        (t.pcscf, t.port_pc, t.ue, t.port_us, t.spi_us, Dir.OUT),
        (t.ue, t.port_us, t.pcscf, t.port_pc, t.spi_pc, Dir.IN),
    ]


def sas(t: Tunnel, algs: EspAlgs) -> list[SA]:
    """SA1..SA4 of the tunnel."""
    return [
        SA(src, dst, spi, Selector(src, dst, sport, dport, user=t.marker), algs,
           reqid=spi, lifetime=t.lifetime)
        for src, sport, dst, dport, spi, _ in _flows(t)
    ]


def policies(t: Tunnel) -> list[Policy]:
    """The policy of each SA (in for SA1 and SA4, out for SA2 and SA3), same order.

    They share the SAs' lifetime, so that when the kernel expires a tunnel it leaves no
    policy behind that would drop the flow's packets.
    """
    return [
        Policy(Selector(src, dst, sport, dport, user=t.marker), direction,
               Template(src, dst, reqid=spi), PRIORITY, t.lifetime)
        for src, sport, dst, dport, spi, direction in _flows(t)
    ]


def _undo(x: Xfrm, requests: list[Request], error: BaseException) -> None:
    """Delete what was added; a failure here is noted on the error being raised."""
    try:
        results = x.batch(requests)
    except OSError as e:
        error.add_note(f"rollback failed: {e}")
        return
    for r in results:
        if r is not None and not isinstance(r, XfrmNotFound):
            error.add_note(f"rollback failed: {r}")


def _first_error(results: list[XfrmError | None]) -> XfrmError | None:
    return next((e for e in results if e is not None), None)


def install(x: Xfrm, tunnel: Tunnel) -> None:
    """Add the 4 SAs, then the 4 policies; on any failure remove what was added and raise.

    SAs go first, in their own batch, so that a policy never exists without its SA, not even
    for the time of a failed install. The error raised is the first refusal, unchanged.
    """
    algs = esp_algs(tunnel.alg, tunnel.ealg, tunnel.ck, tunnel.ik)
    alg_attrs = codec.alg_attrs(algs)
    the_sas = sas(tunnel, algs)
    the_policies = policies(tunnel)
    sa_results = x.batch([codec.new_sa(sa, alg_attrs) for sa in the_sas])
    error = _first_error(sa_results)
    added_sas = [del_sa(SAId(sa.dst, sa.spi)) for sa, r in zip(the_sas, sa_results) if r is None]
    if error is not None:
        _undo(x, added_sas, error)
        raise error
    try:
        pol_results = x.batch([new_policy(p) for p in the_policies])
    except BaseException as e:
        # which policies went in is unknown: remove those that are ours, never a flow's
        # policy another tunnel holds (a refused EEXIST)
        try:
            for r in _remove_policies(x, the_policies):
                if not isinstance(r, XfrmNotFound):
                    e.add_note(f"rollback failed: {r}")
        except OSError as undo_error:
            e.add_note(f"rollback failed: {undo_error}")
        _undo(x, added_sas, e)
        raise
    error = _first_error(pol_results)
    if error is not None:
        added = [
            del_policy(PolicyId(p.dir, p.sel))
            for p, r in zip(the_policies, pol_results)
            if r is None
        ]
        _undo(x, added + added_sas, error)
        raise error


def remove(x: Xfrm, tunnel: Tunnel) -> list[SAId | PolicyId]:
    """Delete one tunnel's policies, then its SAs; returns the pieces that were already gone."""
    return remove_all(x, [tunnel])


def holds(want: Policy, have: PolicyInfo) -> bool:
    """Is the kernel's policy on this flow the tunnel's own: its template names the tunnel's
    SA (addresses and reqid, which is the SPI)? Another tunnel with the same addresses and
    ports (a stale one, one the store forgot) would have its own reqid there."""
    w = want.tmpl
    return have.sel == want.sel and [(t.src, t.dst, t.reqid, t.proto, t.mode)
                                     for t in have.templates] == [(w.src, w.dst, w.reqid,
                                                                   w.proto, w.mode)]


def _remove_policies(x: Xfrm, the_policies: Sequence[Policy]) -> list[XfrmError]:
    """Delete those of the policies the kernel holds as ours, each by its index: removal by
    selector would take whatever policy holds the flow, even another live tunnel's. Returns
    a result per policy that was not deleted (not found, or held by another tunnel)."""
    found = x.get_policies([PolicyId(p.dir, p.sel) for p in the_policies])
    results: list[XfrmError] = []
    mine = []
    for want, have in zip(the_policies, found):
        if isinstance(have, XfrmError):
            results.append(have)
        elif holds(want, have):
            mine.append(have.id)
        else:  # another tunnel's policy on the same flow: this one's is gone
            results.append(XfrmNotFound("delete", errno.ENOENT, PolicyId(want.dir, want.sel),
                                        f"the flow's policy is another tunnel's (reqid "
                                        f"{[t.reqid for t in have.templates]})"))
    return results + [r for r in x.batch([del_policy(pid) for pid in mine]) if r is not None]


def remove_all(x: Xfrm, tunnels: Sequence[Tunnel]) -> list[SAId | PolicyId]:
    """Delete every policy of the tunnels, then every SA, in batches; returns the pieces
    that were already gone.

    Policies first, so no policy is ever left without its SA; only a tunnel's own policies
    (`holds`), by index. Every piece is tried; a refusal other than "not found" is raised
    after all were tried.
    """
    pol_results = _remove_policies(x, [p for t in tunnels for p in policies(t)])
    sa_results = x.batch([del_sa(SAId(dst, spi))
                          for t in tunnels for _, _, dst, _, spi, _ in _flows(t)])
    missing: list[SAId | PolicyId] = []
    for r in pol_results + sa_results:
        if isinstance(r, XfrmNotFound):
            missing.append(r.what)
        elif r is not None:
            raise r
    return missing


def renew(x: Xfrm, tunnel: Tunnel, deadline: float, now: float) -> list[SAId | PolicyId]:
    """Give the tunnel's 4 SAs and 4 policies a hard lifetime that ends at `deadline` (epoch
    seconds): `renew_all` for one tunnel; its refusal other than "not found" is raised."""
    (done,) = renew_all(x, [(tunnel, deadline)], now)
    if done.error is not None:
        raise done.error
    return done.missing


@dataclass(frozen=True)
class Renewed:
    """What a renewal found: the pieces that were gone, and a refusal other than that."""
    missing: list[SAId | PolicyId]
    error: XfrmError | None = None


def renew_all(x: Xfrm, wanted: Sequence[tuple[Tunnel, float]], now: float,
              added: Sequence[float | None] | None = None) -> list[Renewed]:
    """Give each tunnel's 4 SAs and 4 policies a hard lifetime that ends at its deadline
    (epoch seconds), without their keys (never stored), in two round trips for all of them:
    one look-up batch, one update batch. One result per tunnel.

    SAs: XFRM_MSG_UPDSA copies only the lifetime into the existing SA (the keys in the
    message, zeros of the right length, are ignored) and keeps its add_time, from which the
    kernel counts: each SA's new value is computed from its own add_time, read with GETSA,
    or, where `added` gives a time the SAs cannot be older than (their lease was taken
    before they went in), from that time's whole second, without a look-up: they then end
    at the deadline or as much later as they went in after it. Policies:
    XFRM_MSG_UPDPOLICY replaces the policy (same selector, template and index, add_time now);
    only a policy that is the tunnel's own (`holds`) is replaced, never another tunnel's on
    the same flow.
    """
    plans = []
    sa_ids: list[SAId] = []
    pol_ids: list[PolicyId] = []
    for n, (tunnel, deadline) in enumerate(wanted):
        algs = esp_algs(tunnel.alg, tunnel.ealg, tunnel.ck, tunnel.ik)
        the_sas, the_policies = sas(tunnel, algs), policies(tunnel)
        since = added[n] if added is not None else None
        plans.append((deadline, codec.alg_attrs(algs), the_sas, the_policies, since))
        if since is None:
            sa_ids += [SAId(sa.dst, sa.spi) for sa in the_sas]
        pol_ids += [PolicyId(p.dir, p.sel) for p in the_policies]
    found_sas, found_pols = x.look_up(sa_ids, pol_ids) if plans else ([], [])
    results: list[list[XfrmError | None]] = [[] for _ in plans]
    updates: list[Request] = []
    owners: list[int] = []
    i_sa = i_pol = 0
    for n, (deadline, alg_attrs, the_sas, the_policies, since) in enumerate(plans):
        if since is not None:  # UPDSA answers ESRCH for an SA that is gone: "missing"
            hard = lifetimes.seconds(deadline, math.floor(since), now)
            for sa in the_sas:
                updates.append(update_sa(_with_lifetime(sa, hard), alg_attrs))
                owners.append(n)
        else:
            for sa, have in zip(the_sas, found_sas[i_sa:i_sa + len(the_sas)]):
                if isinstance(have, XfrmError):
                    results[n].append(have)
                else:
                    hard = lifetimes.seconds(deadline, have.add_time, now)
                    updates.append(update_sa(_with_lifetime(sa, hard), alg_attrs))
                    owners.append(n)
            i_sa += len(the_sas)
        pol_hard = lifetimes.seconds(deadline, now, now)
        for want, have in zip(the_policies, found_pols[i_pol:i_pol + len(the_policies)]):
            if isinstance(have, XfrmError):
                results[n].append(have)
            elif not holds(want, have):
                results[n].append(XfrmNotFound("update", errno.ENOENT,
                                               PolicyId(want.dir, want.sel),
                                               "the flow's policy is another tunnel's"))
            else:
                updates.append(update_policy(replace(want, lifetime=Lifetime(hard=pol_hard))))
                owners.append(n)
        i_pol += len(the_policies)
    for owner, r in zip(owners, x.batch(updates) if updates else []):
        results[owner].append(r)
    return [_renewed(rs) for rs in results]


def _renewed(results: list[XfrmError | None]) -> Renewed:
    missing: list[SAId | PolicyId] = []
    error: XfrmError | None = None
    for r in results:
        if isinstance(r, XfrmNotFound):
            missing.append(r.what if not isinstance(r.what, (SA, Policy)) else
                           SAId(r.what.dst, r.what.spi) if isinstance(r.what, SA)
                           else PolicyId(r.what.dir, r.what.sel))
        elif r is not None and error is None:
            error = r
    return Renewed(missing, error)


def _with_lifetime(sa: SA, hard: int) -> SA:
    return replace(sa, lifetime=Lifetime(hard=hard))
