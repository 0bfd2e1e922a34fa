"""Have the kernel ready for the first phone: its ESP and crypto code loaded at start.

A distribution kernel builds ESP and each cipher as modules, loaded the first time an SA
needs them: the first phones after a start waited for modprobe (about 2 s for the C module's
first REGISTER, seen here; 1 ms an SA at first against 0.03 ms after) and retransmitted. At
start, one throw-away SA per algorithm pair we may negotiate is added and deleted again, on
loopback, with our marker, so a crash in between leaves nothing the next start's
reconciliation does not remove. A pair the kernel refuses is reported: phones offering only
that pair will get 503.
"""
from __future__ import annotations

from ipsec.algorithms import VALID_PAIRS, esp_algs
from ipsec.xfrm import SA, SAId, Selector, Xfrm, codec, del_sa

PROBE_SPI = 0xFFFFFF00  # far above any configured range; one per probe from here
LOOPBACK = {4: "127.0.0.1", 6: "::1"}


def probes(families: tuple[int, ...], marker: int) -> list[tuple[str, str, SA]]:
    """(alg, ealg, SA) to add: every valid pair over the first family, one over each other."""
    out = []
    pairs = sorted(VALID_PAIRS)
    for n, family in enumerate(families):
        addr = LOOPBACK[family]
        for alg, ealg in pairs if n == 0 else pairs[:1]:
            spi = PROBE_SPI + len(out)
            algs = esp_algs(alg, ealg, bytes(16), bytes(16))
            out.append((alg, ealg, SA(addr, addr, spi, Selector(addr, addr, user=marker), algs,
                                      reqid=spi)))
    return out


def warm(x: Xfrm, families: tuple[int, ...], marker: int) -> list[str]:
    """Add and delete the probes (two batches); returns what the kernel refused, by pair."""
    planned = probes(families, marker)
    added = x.batch([codec.new_sa(sa) for _, _, sa in planned])
    refused = [f"{alg}/{ealg} over IPv{sa.family}: {err}"
               for (alg, ealg, sa), err in zip(planned, added) if err is not None]
    x.batch([del_sa(SAId(sa.dst, sa.spi)) for (_, _, sa), err in zip(planned, added)
             if err is None])
    return refused


