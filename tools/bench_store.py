"""How fast the shared store is: leases per second (1 and 8 processes) and contact look-ups per
second with 100,000 contacts stored. Run: `.venv/bin/python -m tools.bench_store`.

Each figure is measured on a fresh file in a temporary directory (on the same file system as
the system's temp dir), with the store's real settings (WAL, synchronous=NORMAL).
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable

from ipsec.sipuri import Address
from ipsec.store import Store, Tunnel, UeSide

CYCLES = 5000
PROCESSES = 8
LOOKUPS = 20000


def make(path: str, spi_range: int) -> Store:
    return Store(path, spi_start=0x1000, spi_range=spi_range, client_port=5100,
                 server_port=5200, max_connections=10)


def in_processes(count: int, body: Callable[[int], None]) -> float:
    """Wall time for `count` forked processes each running body(index)."""
    start = time.perf_counter()
    pids = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                body(index)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0]
    if failed:
        raise SystemExit(f"{len(failed)} benchmark processes failed")
    return time.perf_counter() - start


def bench_leases(directory: str, cycles: int) -> None:
    path = os.path.join(directory, "leases.db")
    store = make(path, spi_range=2 * cycles)

    start = time.perf_counter()
    leases = [store.lease(f"10.0.{i % 250}.{i % 200}") for i in range(cycles)]
    leased = time.perf_counter() - start
    start = time.perf_counter()
    for lease in leases:
        store.release(lease)
    released = time.perf_counter() - start
    print(f"1 process:   {cycles / leased:8.0f} leases/s, {cycles / released:8.0f} releases/s")

    def churn(_: int) -> None:
        worker = make(path, spi_range=2 * cycles)
        for i in range(cycles):
            worker.release(worker.lease(f"10.1.{i % 250}.1"))

    start = time.perf_counter()
    for i in range(cycles):
        store.release(store.lease(f"10.1.{i % 250}.1"))
    single = cycles / (time.perf_counter() - start)
    print(f"1 process:   {single:8.0f} lease+release cycles/s")
    elapsed = in_processes(PROCESSES, churn)
    print(f"{PROCESSES} processes: {PROCESSES * cycles / elapsed:8.0f} lease+release cycles/s "
          f"(all processes together, {PROCESSES} x {cycles} cycles, {os.cpu_count()} CPUs)")
    store.close()


def populate(store: Store, contacts: int) -> list[tuple[int, str, int, int]]:
    """Register `contacts` phones, each with a tunnel; returns how to find each again."""
    digest = store.keys_digest(bytes(16), bytes(16))
    phones = []
    for n in range(contacts):
        host = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        port_uc, port_us = 20000 + n % 1000, 30000 + n % 1000
        received = Address(host, 5060)
        contact = store.save_pending(f"sip:u{n}@ims.example", f"sip:u{n}@{host}:{port_us}",
                                     received, received)
        lease = store.lease(host)
        store.set_tunnel(contact.id, Tunnel(lease, UeSide(host, n, n + 1, port_uc, port_us),
                                            "hmac-sha-1-96", "aes-cbc", "192.0.2.1", digest,
                                            "offer", "server"))
        store.set_registered(contact.id, time.time() + 3600)  # MT look-ups find registered ones
        phones.append((n, host, port_uc, port_us))
    return phones


def bench_lookups(directory: str, contacts: int, lookups: int) -> None:
    path = os.path.join(directory, "contacts.db")
    store = make(path, spi_range=2 * contacts + 2)
    start = time.perf_counter()
    phones = populate(store, contacts)
    elapsed = time.perf_counter() - start
    print(f"stored {contacts} contacts with tunnels in {elapsed:.1f} s "
          f"({contacts / elapsed:.0f} save_pending+lease+set_tunnel/s)")
    rng = random.Random(1)
    sample = [rng.choice(phones) for _ in range(lookups)]
    rules: dict[str, Callable[[tuple[int, str, int, int]], object]] = {
        "find_by_uri (contact URI)": lambda p: store.find_by_uri(f"sip:u@{p[1]}:{p[3]}"),
        "find_by_uri (alias)": lambda p: store.find_by_uri(
            f"sip:u@192.168.0.1:{p[3]};alias={p[1]}~5060~1"),
        "find_by_source": lambda p: store.find_by_source(p[1], p[2]),
        "find_by_received": lambda p: store.find_by_received(Address(p[1], 5060)),
        "find_by_aor_received": lambda p: store.find_by_aor_received(
            f"sip:u{p[0]}@ims.example", p[1], 5060),
    }
    for name, find in rules.items():
        start = time.perf_counter()
        hits = sum(find(phone) is not None for phone in sample)
        rate = lookups / (time.perf_counter() - start)
        print(f"1 process:   {rate:8.0f} look-ups/s  {name} ({hits}/{lookups} found)")

    def look(_: int) -> None:
        worker = make(path, spi_range=2 * contacts + 2)
        for phone in sample:
            if worker.find_by_source(phone[1], phone[2]) is None:
                raise SystemExit("a stored contact was not found")

    elapsed = in_processes(PROCESSES, look)
    print(f"{PROCESSES} processes: {PROCESSES * lookups / elapsed:8.0f} look-ups/s  "
          f"find_by_source (all processes together)")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=CYCLES, help="lease cycles per process")
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=LOOKUPS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_store.") as directory:
        bench_leases(directory, args.cycles)
        bench_lookups(directory, args.contacts, args.lookups)


if __name__ == "__main__":
    main()
