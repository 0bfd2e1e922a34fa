"""The state invariant every kernel and end-to-end test ends with, read without the code under
test (sqlite3 on the store file, `ip -s xfrm` on the P-CSCF's namespace):

- every tunnel a contact of the store uses (in use or pending) has exactly its 4 SAs and 4
  policies in the kernel: selectors (addresses, /32 or /128, ports, any protocol, our marker),
  SPIs, reqids, transport mode, algorithms with their key and ICV sizes, directions, one
  template each (ESP, transport, required, the SA's reqid), priority 0, action allow;
- nothing of ours is in the kernel that no such tunnel explains (the P-CSCF's namespace holds
  only ours: any other entry there is a stray too);
- no lease row is left that no contact uses (a leaked lease).

33.203 7.1's table is written here again from the test's side: SA1 uc->ps (spi_ps, in),
SA2 ps->uc (spi_uc, out), SA3 pc->us (spi_us, out), SA4 us->pc (spi_pc, in).
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass, replace

from esp_net import run

MARKER = 0x50435343
_HOST = {False: 32, True: 128}

# (alg, ealg) -> what `ip xfrm state` shows: {kind: (name, key bits, icv bits or None)}
_AUTH = {"hmac-md5-96": ("hmac(md5)", 128, 96), "hmac-sha-1-96": ("hmac(sha1)", 160, 96)}
_ENC = {"null": ("ecb(cipher_null)", 0, None), "aes-cbc": ("cbc(aes)", 128, None),
        "des-ede3-cbc": ("cbc(des3_ede)", 192, None)}


def kernel_algs(alg: str, ealg: str) -> dict[str, tuple[str, int, int | None]]:
    if alg == "aes-gmac":
        return {"aead": ("rfc4543(gcm(aes))", 160, 128)}
    if ealg == "aes-gcm":
        return {"aead": ("rfc4106(gcm(aes))", 160, 128)}
    return {"auth-trunc": _AUTH[alg], "enc": _ENC[ealg]}


@dataclass(frozen=True)
class KernelSA:
    src: str
    dst: str
    spi: int
    reqid: int
    mode: str
    sel: tuple  # (src, plen, dst, plen, sport, dport, proto, uid)
    algs: tuple  # sorted (kind, name, key bits, icv)
    hard: int  # expire add hard (sec), 0 = none


@dataclass(frozen=True)
class KernelPolicy:
    sel: tuple
    dir: str
    action: str
    priority: int
    tmpls: tuple  # ((src, dst, proto, reqid, mode, level), ...)
    hard: int


def _sel(line: str) -> tuple:
    m = re.search(r"src (\S+)/(\d+) dst (\S+)/(\d+)(.*)", line)
    rest = m.group(5)
    proto = re.search(r"proto (\S+)", rest)
    sport = re.search(r"sport (\d+)", rest)
    dport = re.search(r"dport (\d+)", rest)
    uid = re.search(r"uid (\d+)", rest)
    return (m.group(1), int(m.group(2)), m.group(3), int(m.group(4)),
            int(sport.group(1)) if sport else 0, int(dport.group(1)) if dport else 0,
            proto.group(1) if proto else "any", int(uid.group(1)) if uid else None)


def _hard(block: str) -> int:
    m = re.search(r"expire add: soft \d+\(sec\), hard (\d+)\(sec\)", block)
    return int(m.group(1)) if m else 0


def _blocks(text: str) -> list[str]:
    return [b for b in re.split(r"^(?=src )", text, flags=re.M) if b.strip()]


def kernel_sas(ns: str) -> list[KernelSA]:
    out = []
    for block in _blocks(run("ip", "-n", ns, "-s", "xfrm", "state")):
        head = re.match(r"src (\S+) dst (\S+)", block)
        ident = re.search(r"proto (\S+) spi 0x([0-9a-f]+)\S* reqid (\d+)\S* mode (\S+)", block)
        sel = re.search(r"^\s*sel (.*)$", block, re.M)
        algs = tuple(sorted(  # a null cipher's key shows as "0x" or nothing, no bits
            (kind, name, int(bits or 0), int(icv) if icv else None)
            for kind, name, bits, icv in re.findall(
                r"^\s*(auth-trunc|auth|enc|aead|comp) (\S+)(?: 0x[0-9a-f]*)?(?: \((\d+) bits\))?"
                r"(?: (\d+))?\s*$", block, re.M)))
        assert ident and ident.group(1) == "esp", f"not an ESP SA: {block}"
        out.append(KernelSA(head.group(1), head.group(2), int(ident.group(2), 16),
                            int(ident.group(3)), ident.group(4), _sel(sel.group(1)), algs,
                            _hard(block)))
    return out


def kernel_policies(ns: str) -> list[KernelPolicy]:
    out = []
    for block in _blocks(run("ip", "-n", ns, "-s", "xfrm", "policy")):
        first = block.splitlines()[0]
        d = re.search(r"dir (\S+) action (\S+) index \d+ priority (\d+)", block)
        tmpls = tuple(
            (src, dst, proto, int(reqid), mode, level)
            for src, dst, proto, reqid, mode, level in re.findall(
                r"tmpl src (\S+) dst (\S+)\s+proto (\S+) spi \S+ reqid (\d+)\S* mode (\S+)"
                r"\s+level (\S+)", block))
        out.append(KernelPolicy(_sel(first), d.group(1), d.group(2), int(d.group(3)), tmpls,
                                _hard(block)))
    return out


def expected(row: sqlite3.Row) -> tuple[list[KernelSA], list[KernelPolicy]]:
    """What one stored tunnel must have in the kernel (hard lifetimes are not compared)."""
    pc, ue = row["pcscf_host"], row["ue_host"]
    plen = _HOST[":" in pc]
    algs = tuple(sorted((kind, *v) for kind, v in kernel_algs(row["alg"], row["ealg"]).items()))
    flows = [(ue, row["port_uc"], pc, row["port_ps"], row["spi_ps"], "in"),
             (pc, row["port_ps"], ue, row["port_uc"], row["spi_uc"], "out"),
             (pc, row["port_pc"], ue, row["port_us"], row["spi_us"], "out"),
             (ue, row["port_us"], pc, row["port_pc"], row["spi_pc"], "in")]
    sas, pols = [], []
    for src, sport, dst, dport, spi, direction in flows:
        sel = (src, plen, dst, plen, sport, dport, "any", MARKER)
        sas.append(KernelSA(src, dst, spi, spi, "transport", sel, algs, 0))
        pols.append(KernelPolicy(sel, direction, "allow", 0,
                                 ((src, dst, "esp", spi, "transport", "required"),), 0))
    return sas, pols


def _store_rows(store_path) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
    """(tunnels some contact uses, lease rows no contact uses)."""
    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        used = "id IN (SELECT tunnel_id FROM contacts UNION SELECT pending_tunnel_id FROM contacts)"
        return (db.execute(f"SELECT * FROM tunnels WHERE {used}").fetchall(),
                db.execute(f"SELECT * FROM tunnels WHERE NOT {used}").fetchall())
    finally:
        db.close()


def problems(ns: str, store_path=None, *, lifetimes: bool = False,
             ours_only: bool = False) -> list[str]:
    """Every way the kernel of `ns` and the store differ (empty: the invariant holds). No
    store: nothing of ours may be in the kernel. `lifetimes`: every SA and policy must also
    carry a hard lifetime. `ours_only`: entries without our marker are someone else's (a
    test's own); otherwise the namespace must hold ours only."""
    rows, leaked = _store_rows(store_path) if store_path is not None else ([], [])
    found: list[str] = [f"leaked lease spi-c={r['spi_pc']} (ue {r['ue_host']}): no contact uses it"
                        for r in leaked]
    have_sas = [s for s in kernel_sas(ns) if not ours_only or s.sel[-1] == MARKER]
    have_pols = [p for p in kernel_policies(ns) if not ours_only or p.sel[-1] == MARKER]
    sas_by_id = {(s.dst, s.spi): s for s in have_sas}
    pols_by_flow: dict[tuple, list[KernelPolicy]] = {}
    for p in have_pols:
        pols_by_flow.setdefault((p.sel, p.dir), []).append(p)
    explained_sas, explained_pols = set(), set()
    for row in rows:
        name = f"tunnel spi-c={row['spi_pc']} (ue {row['ue_host']})"
        want_sas, want_pols = expected(row)
        for want in want_sas:
            have = sas_by_id.get((want.dst, want.spi))
            explained_sas.add((want.dst, want.spi))
            if have is None:
                found.append(f"{name}: SA spi {want.spi} -> {want.dst} missing")
            elif replace(have, hard=0) != want or (lifetimes and have.hard == 0):
                found.append(f"{name}: SA spi {want.spi} is {have}, expected {want}"
                             + (" with a hard lifetime" if lifetimes else ""))
        for want in want_pols:
            key = (want.sel, want.dir)
            explained_pols.add(key)
            have = pols_by_flow.get(key, [])
            if len(have) != 1:
                found.append(f"{name}: policy {want.dir} {want.sel}: {len(have)} in the kernel")
            elif replace(have[0], hard=0) != want or (lifetimes and have[0].hard == 0):
                found.append(f"{name}: policy {want.dir} is {have[0]}, expected {want}"
                             + (" with a hard lifetime" if lifetimes else ""))
    found += [f"stray SA {s}" for s in have_sas if (s.dst, s.spi) not in explained_sas]
    found += [f"stray policy {p}" for p in have_pols if (p.sel, p.dir) not in explained_pols]
    return found


def settled_problems(ns: str, store_path=None, *, settle: float = 3.0,
                     lifetimes: bool = False, ours_only: bool = False) -> list[str]:
    """`problems`, looked at until none is left or `settle` seconds passed (the sweep runs
    every second: a tunnel whose removal waits for its last reply is gone a second later)."""
    deadline = time.monotonic() + settle
    while True:
        found = problems(ns, store_path, lifetimes=lifetimes, ours_only=ours_only)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.25)


def assert_holds(ns: str, store_path=None, **kw) -> None:
    found = settled_problems(ns, store_path, **kw)
    assert not found, "store and kernel disagree:\n  " + "\n  ".join(found[:40])
