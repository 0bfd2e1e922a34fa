"""What every end-to-end scenario must show on the wire and in the kernel."""
from __future__ import annotations

import itertools
import time
from contextlib import contextmanager

import esp_net
import invariant
from pcscf_net import Phone, assert_kernel_matches, assert_no_keys, pcscf_counters, pcscf_states

PROTECTED_PORTS = set(range(5062, 5065))
_n = itertools.count()


@contextmanager
def through_esp(phone: Phone, *sa_names: str, strangers: bool = False):
    """Counters of the named SAs (sa1..sa4 of the phone's tunnel at the end) must rise, and
    the phone's link must carry no cleartext to or from a protected port. `strangers`: other
    sockets on the phone's address have sent cleartext to our protected ports, and what
    Kamailio still answers them (TM's late replies: the 408 for a request the silent core
    never answered, sent fr_timer after it and retransmitted to an INVITE's sender that
    never ACKs) goes back in cleartext to those sockets; then only cleartext to or from the
    phone's own protected ports fails."""
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
    ports = {t.port_uc, t.port_us} if strangers else PROTECTED_PORTS | {t.port_uc, t.port_us}
    clear = [p for p in cap.cleartext() if p.sport in ports or p.dport in ports]
    assert not clear, f"cleartext between protected ports: {clear[:5]}"
    for m in phone.seen:
        assert_no_keys(m)
    assert_kernel_matches(phone.link, t)


def assert_store_matches_kernel(link, store_path, settle: float = 3.0) -> None:
    """The invariant (tests/kernel/invariant.py): every tunnel a contact uses has exactly its
    4 SAs and 4 policies in the P-CSCF's kernel, nothing else is there, no lease is leaked."""
    invariant.assert_holds(link.pc, store_path, settle=settle, lifetimes=True)
