"""recvmmsg(2): many netlink datagrams in one system call, for look-up batches.

The kernel answers each GETSA / GETPOLICY of a batch in a datagram of its own, and a datagram
is one `recv`: the sweep's renewals looked up 4 policies per phone, 4 system calls per phone
(each a round trip through the host inside User-mode Linux). recvmmsg with MSG_WAITFORONE
blocks for the first datagram and then takes every one already queued, up to COUNT, in the
same call. Python's socket module has no recvmmsg: it is called through ctypes.

The buffer is a private anonymous mapping: its pages become the process's own only as
datagrams land in them, so a process that never looks up more than a few entries pays for a
few pages, and a worker forked after a look-up writes its own copy.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket

MSG_TRUNC = 0x20
MSG_WAITFORONE = 0x10000
COUNT = 64  # datagrams per call
SIZE = 8192  # bytes per datagram: a GET answer or an ACK is well under 1 KiB


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_IOVec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


def _libc() -> ctypes.CDLL:
    """The C library already loaded in this process (Kamailio's, or Python's): no search
    (ctypes.util.find_library runs `ldconfig -p`, a child process, in Kamailio's start)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc: the symbols of what this process already has loaded
        return ctypes.CDLL(None, use_errno=True)


_recvmmsg = _libc().recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_MMsgHdr), ctypes.c_uint, ctypes.c_int,
                      ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


class Receiver:
    """COUNT buffers of SIZE bytes, read into by one recvmmsg each time."""

    def __init__(self, count: int = COUNT, size: int = SIZE) -> None:
        self.count, self.size = count, size
        # private: Python's default for an anonymous mapping is MAP_SHARED, which a fork
        # would leave one buffer for a main process and every worker it forked
        self._area = mmap.mmap(-1, count * size, flags=mmap.MAP_PRIVATE)
        self.view = memoryview(self._area)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._area))
        self._iov = (_IOVec * count)()
        self._msgs = (_MMsgHdr * count)()
        for i in range(count):
            self._iov[i].base = base + i * size
            self._iov[i].len = size
            self._msgs[i].hdr.iov = ctypes.pointer(self._iov[i])
            self._msgs[i].hdr.iovlen = 1

    def receive(self, sock: socket.socket) -> list[tuple[int, int]]:
        """Wait for one datagram, take those queued behind it too: (offset in `view`, length)
        of each, in order. A datagram larger than SIZE would be cut: that is an error."""
        while True:
            n = _recvmmsg(sock.fileno(), self._msgs, self.count, MSG_WAITFORONE, None)
            if n >= 0:
                break
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"recvmmsg on the XFRM socket: {os.strerror(err)}")
        out = []
        for i in range(n):
            msg = self._msgs[i]
            if msg.hdr.flags & MSG_TRUNC:
                raise OSError(errno.EMSGSIZE, f"an XFRM answer longer than {self.size} bytes "
                                              "was cut short")
            out.append((i * self.size, msg.len))
        return out
