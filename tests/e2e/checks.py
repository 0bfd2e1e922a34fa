"""What every end-to-end scenario must show on the wire and in the kernel."""
from __future__ import annotations

import itertools
import re
import sqlite3
import time
from contextlib import contextmanager

import esp_net
from pcscf_net import Phone, assert_kernel_matches, assert_no_keys, pcscf_counters, pcscf_states

PROTECTED_PORTS = set(range(5062, 5065))
_n = itertools.count()


@contextmanager
def through_esp(phone: Phone, *sa_names: str):
    """Counters of the named SAs (sa1..sa4 of the phone's tunnel at the end) must rise, and
    the phone's link must carry no cleartext to or from a protected port."""
    before = pcscf_counters(phone.link)
    with esp_net.Capture(phone.link, f"e2e-{next(_n)}") as cap:
        yield cap
        time.sleep(0.2)
    after = pcscf_counters(phone.link)
    t = phone.tunnel
    spis = {"sa1": t.spi_ps, "sa2": t.spi_uc, "sa3": t.spi_us, "sa4": t.spi_pc}
    for name in sa_names:
        spi = spis[name]
        assert after.get(spi, 0) > before.get(spi, 0), f"{name} (spi {spi}) carried nothing"
    ports = PROTECTED_PORTS | {t.port_uc, t.port_us}
    clear = [p for p in cap.cleartext() if p.sport in ports or p.dport in ports]
    assert not clear, f"cleartext between protected ports: {clear[:5]}"
    for m in phone.seen:
        assert_no_keys(m)
    assert_kernel_matches(phone.link, t)


def _flows_of(row: sqlite3.Row) -> tuple[set, set]:
    """What one stored tunnel must have in the kernel (33.203 7.1, from the test's own table):
    its 4 SAs as (src, dst, spi) and its 4 policies as (src, sport, dst, dport, dir)."""
    pc, ue = row["pcscf_host"], row["ue_host"]
    flows = [(ue, row["port_uc"], pc, row["port_ps"], row["spi_ps"], "in"),
             (pc, row["port_ps"], ue, row["port_uc"], row["spi_uc"], "out"),
             (pc, row["port_pc"], ue, row["port_us"], row["spi_us"], "out"),
             (ue, row["port_us"], pc, row["port_pc"], row["spi_pc"], "in")]
    return ({(s, d, spi) for s, _, d, _, spi, _ in flows},
            {(s, sp, d, dp, direction) for s, sp, d, dp, _, direction in flows})


def kernel_policies(link) -> set[tuple]:
    text = esp_net.run("ip", "-n", link.pc, "xfrm", "policy")
    return {(src, int(sp), dst, int(dp), direction) for src, dst, sp, dp, direction in re.findall(
        r"^src (\S+?)(?:/\d+)? dst (\S+?)(?:/\d+)?\s.*?sport (\d+) dport (\d+).*?\n\s*dir (\w+)",
        text, re.M | re.S)}


def assert_store_matches_kernel(link, store_path) -> None:
    """Every tunnel the store holds (in use, pending or still being removed) has exactly its
    SAs and policies in the P-CSCF's kernel, and the kernel has nothing else: read with
    sqlite3 and `ip xfrm`, not with the code under test."""
    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM tunnels WHERE ue_host IS NOT NULL").fetchall()
    finally:
        db.close()
    want_sas, want_pols = set(), set()
    for row in rows:
        sas, pols = _flows_of(row)
        want_sas |= sas
        want_pols |= pols
    have_sas = {(s["src"], s["dst"], s["spi"]) for s in pcscf_states(link)}
    assert have_sas == want_sas, (f"SAs only in the kernel: {sorted(have_sas - want_sas)}; "
                                  f"only in the store: {sorted(want_sas - have_sas)}")
    have_pols = kernel_policies(link)
    assert have_pols == want_pols, (f"policies only in the kernel: {sorted(have_pols - want_pols)};"
                                    f" only in the store: {sorted(want_pols - have_pols)}")
