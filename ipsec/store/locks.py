"""Per-phone mutual exclusion across Kamailio's worker processes.

Building a phone's tunnel reads the store, changes the kernel, then the store again; two
workers doing that for one phone at once (two challenges in flight, a challenge and a
teardown) could each see the other's half-done state and leave kernel entries no row
describes. So that work holds the lock of the phone's address.

The locks are open-file-description byte-range locks (F_OFD_SETLKW) on one file beside the
store: a waiter sleeps in the kernel and wakes the moment the holder is done, a dead holder's
lock goes with its process, and, unlike POSIX record locks, two threads or two opens in one
process exclude each other too. Addresses are hashed onto a fixed number of bytes (stripes):
phones sharing a stripe merely wait for each other.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

from ipsec import forks
from ipsec.sipuri import normalize_host

STRIPES = 4096
# struct flock on Linux x86_64/aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (0 for OFD locks), padded to 32 bytes.
_FLOCK = "@hhqqi4x"


WRITER_BYTE = STRIPES  # the store's writer lock, past the phones' stripes


class _LockFile:
    """One descriptor on the lock file per process, opened lazily (after Kamailio's fork)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._gen = -1
        self._mine: set[int] = set()  # bytes this process holds (a nested take is a no-op)

    def open(self) -> None:
        """Open this process's descriptor now (it opens on first use otherwise)."""
        self._file()

    def _file(self) -> int:
        if self._fd < 0 or self._gen != forks.generation():
            # an inherited descriptor shares its locks with the parent: never use it
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._gen = forks.generation()
        return self._fd

    @contextmanager
    def _held(self, byte: int, wait: bool = True) -> Iterator[bool]:
        """Hold `byte` for the body; yields False (and holds nothing) when `wait` is off and
        another process holds it. Taking a byte this process already holds is a no-op: an
        unlock at the inner level would release the outer holder's lock."""
        if byte in self._mine and self._gen == forks.generation():
            yield True
            return
        fd = self._file()
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK,
                        struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        except (BlockingIOError, PermissionError):  # EAGAIN (EACCES on some systems)
            yield False
            return
        self._mine.add(byte)
        try:
            yield True
        finally:
            self._mine.discard(byte)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET,
                                                            byte, 1, 0))

    def close(self) -> None:
        """Close this process's descriptor (before the fork, as the store does)."""
        if self._fd >= 0 and self._gen == forks.generation():
            os.close(self._fd)
        self._fd = -1
        self._mine.clear()


class UeLocks(_LockFile):
    """Locks by phone address."""

    @staticmethod
    def stripe(host: str) -> int:
        digest = hashlib.blake2b(normalize_host(host).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % STRIPES

    def held(self, host: str):
        """Hold the lock of `host` (waiting for it) for the body of the `with`."""
        return self._held(self.stripe(host))

    @contextmanager
    def all_held(self, hosts: Iterable[str]) -> Iterator[None]:
        """Hold the locks of all `hosts` for the body, taken in stripe order: two holders of
        several locks never wait for each other, and a worker (which never waits for a second
        phone's lock while it holds one) never waits for such a holder in a cycle."""
        with ExitStack() as held:
            for stripe in sorted({self.stripe(h) for h in hosts}):
                held.enter_context(self._held(stripe))
            yield

    def try_held(self, host: str):
        """As `held`, without waiting: the `with` gets False when another process holds the
        lock of `host` (one phone's worker taking another phone's lock must never wait: two
        such workers would wait for each other)."""
        return self._held(self.stripe(host), wait=False)


class WriterLock(_LockFile):
    """The store's writers take turns here before SQLite's own write lock. Always the
    innermost lock: nothing else is taken while it is held."""

    def held(self):
        return self._held(WRITER_BYTE)
