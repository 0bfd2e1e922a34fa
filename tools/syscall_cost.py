"""What one system call costs here in a tight loop, against a Python call that makes none.

A loop's price. In `make load` the store's ~58 calls per 401 step were measured by taking
them away (tools/load/floor/store.patch): 2-3 ms, ~35-50 us each in User-mode Linux, near
this tool's figure there (README, "The floor").

    .venv/bin/python -m tools.syscall_cost                   # this kernel
    tools/with-esp .venv/bin/python -m tools.syscall_cost    # inside User-mode Linux

Inside User-mode Linux every system call is a round trip through the host (ptrace), and a
clock read is one too (no vDSO there); on a normal kernel a clock read costs no system call.
A page fault is dearer still there: what a forked worker pays for each page of the heap it
shares with its parent, the first time it writes to it.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable

ROUNDS = 20000


def cost(call: Callable[[], object], rounds: int = ROUNDS) -> float:
    """Microseconds per call, the best of three runs (the least disturbed by neighbours)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(rounds):
            call()
        best = min(best, (time.perf_counter() - start) / rounds * 1e6)
    return best


def cow_fault(pages: int = 2000) -> float:
    """Microseconds per copy-on-write fault: a forked child writing to pages it shares with its
    parent, as a Kamailio worker does to the Python heap it inherits (every object a request
    touches has its reference count written)."""
    area = mmap.mmap(-1, pages * mmap.PAGESIZE)
    for i in range(pages):
        area[i * mmap.PAGESIZE] = 1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        start = time.perf_counter()
        for i in range(pages):
            area[i * mmap.PAGESIZE] = 2
        os.write(write_end, struct.pack("d", time.perf_counter() - start))
        os._exit(0)
    os.close(write_end)
    (took,) = struct.unpack("d", os.read(read_end, 8))
    os.close(read_end)
    os.waitpid(pid, 0)
    area.close()
    return took / pages * 1e6


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        fd = os.open(os.path.join(d, "f"), os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, b"x" * 65536)
        page = b"y" * 4096
        lock = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 100, 1, 0)
        unlock = struct.pack("hhqqi", fcntl.F_UNLCK, 0, 100, 1, 0)
        mutex = threading.Lock()

        def lock_unlock() -> None:
            fcntl.fcntl(fd, fcntl.F_SETLK, lock)
            fcntl.fcntl(fd, fcntl.F_SETLK, unlock)

        def acquire_release() -> None:
            mutex.acquire()
            mutex.release()

        rows = [
            ("a Python call (no system call)", lambda: None),
            ("getppid() (the cheapest system call)", os.getppid),
            ("pread 4 KiB", lambda: os.pread(fd, 4096, 8192)),
            ("pwrite 4 KiB", lambda: os.pwrite(fd, page, 8192)),
            ("fcntl lock + unlock (2 calls)", lock_unlock),
            ("time.time()", time.time),
            ("threading.Lock acquire + release", acquire_release),
        ]
        print(f"kernel {os.uname().release}, Python {sys.version.split()[0]}: us per call, "
              f"and as a multiple of getppid()")
        unit = 0.0
        for name, call in rows:
            us = cost(call)
            unit = us if name.startswith("getppid") else unit
            print(f"  {name:<40} {us:8.2f} us" + (f"  {us / unit:5.1f}x" if unit else ""))
        us = cow_fault()
        print(f"  {'a copy-on-write page fault after fork':<40} {us:8.2f} us  {us / unit:5.1f}x")
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
