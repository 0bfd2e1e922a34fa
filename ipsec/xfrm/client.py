"""The XFRM netlink door: one socket per process, every request acknowledged and checked.

Why a raw AF_NETLINK socket and not pyroute2's NetlinkSocket: pyroute2 0.9 routes every
request through its asyncio core and parses every answer into dict-based message objects; it
sends one message per request and has no way to put many messages in one datagram. A tunnel
is 8 messages and a restart flush may be 20,000: we need batches of messages per datagram and
a single pass over their ACKs, at a few microseconds per message. The message layouts still
come from the pyroute2-style classes in `structs`.

Kamailio forks its workers after the script is loaded: the socket is opened on first use and
re-opened when the process id changed, so no two processes ever share a netlink port.

An `Xfrm` belongs to one thread, as a socket does (Kamailio's workers have one). It takes no
lock: CPython 3.11 reads CLOCK_MONOTONIC on every `threading.Lock` acquire, even an
uncontended one, and in User-mode Linux that read is a system call (no vDSO there).
"""
from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .. import forks
from . import codec, mrecv
from . import structs as k
from .errors import XfrmError, XfrmNotFound, xfrm_error
from .model import SA, Dir, Policy, PolicyId, PolicyInfo, SAId, SAInfo, Selector
from .netns import entered

T = TypeVar("T")

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SOCKET_BUFFER = 4 << 20
RECV_BUFFER = 64 << 10  # the kernel caps a dump datagram at 32 KiB
MAX_BATCH_MESSAGES = 64  # bounded: too many messages per datagram gets "Message too long"
MAX_BATCH_BYTES = 32 << 10
NLM_F_DUMP_INTR = 0x10
DUMP_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Flushed:
    """How many of the marked states and policies a flush removed."""

    states: int
    policies: int


class Xfrm:
    """The kernel's XFRM tables (SAD and SPD) of one network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        """`netns`: a name from `ip netns add`, or None for this process's namespace."""
        self._netns = netns
        self._sock: socket.socket | None = None
        self._gen = -1
        self._seq = 0
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._multi: mrecv.Receiver | None = None  # made on the first look-up batch

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, k.NETLINK_XFRM)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        return sock

    def open(self) -> None:
        """Open this process's socket now (it opens on first use otherwise)."""
        self._socket()

    def _socket(self) -> socket.socket:
        gen = forks.generation()
        if self._sock is None or self._gen != gen:
            self.close()  # after a fork: the parent's socket is not ours to read
            if self._netns is None:
                self._sock = self._open()
            else:
                with entered(self._netns):
                    self._sock = self._open()
            self._gen = gen
        return self._sock

    def _next_seqs(self, count: int) -> int:
        """Reserve `count` sequence numbers; returns the one before the first."""
        if self._seq + count > 0xFFFFFFFF:
            self._seq = 0
        base = self._seq
        self._seq += count
        return base

    def batch(self, requests: Sequence[codec.Request],
              replies: dict[int, PolicyInfo | SAInfo] | None = None
              ) -> list[XfrmError | None]:
        """Send the requests in bounded datagrams, read every ACK; one result per request.

        The kernel handles each message of a datagram on its own: one refusal does not stop
        the others, so callers decide what a partial failure means. `replies` collects the
        policies and SAs GETPOLICY and GETSA requests are answered with, by request position.
        """
        results: list[XfrmError | None] = [None] * len(requests)
        sock = self._socket()
        start = 0
        while start < len(requests):
            end, base = self._send_chunk(sock, requests, start)
            self._read_acks(sock, requests, start, end, base, results, replies)
            start = end
        return results

    def get_policies(self, ids: Sequence[PolicyId]) -> list[PolicyInfo | XfrmError]:
        """The policies on these selectors and directions, as the kernel holds them (an
        XfrmNotFound where there is none), in one batch."""
        return self.look_up([], ids)[1]

    def get_states(self, ids: Sequence[SAId]) -> list[SAInfo | XfrmError]:
        """The SAs of these (destination, SPI), as the kernel holds them (an XfrmNotFound
        where there is none), in one batch."""
        return self.look_up(ids, [])[0]

    def look_up(self, sa_ids: Sequence[SAId], policy_ids: Sequence[PolicyId]
                ) -> tuple[list[SAInfo | XfrmError], list[PolicyInfo | XfrmError]]:
        """get_states and get_policies in one batch: one round trip to the kernel."""
        replies: dict[int, PolicyInfo | SAInfo] = {}
        requests = [*(codec.get_sa(sid) for sid in sa_ids),
                    *(codec.get_policy(pid) for pid in policy_ids)]
        errors = self.batch(requests, replies)
        ids = [*sa_ids, *policy_ids]
        found = [e if e is not None else replies.get(i) or XfrmNotFound(
                     "get", errno.ESRCH if i < len(sa_ids) else errno.ENOENT, ids[i], "no answer")
                 for i, e in enumerate(errors)]
        return found[:len(sa_ids)], found[len(sa_ids):]

    def _send_chunk(
        self, sock: socket.socket, requests: Sequence[codec.Request], start: int
    ) -> tuple[int, int]:
        """Send requests[start:end] as one datagram; returns end and the sequence base."""
        parts = []
        size = 0
        end = start
        limit = min(len(requests), start + MAX_BATCH_MESSAGES)
        while end < limit:
            req = requests[end]
            length = codec.HDR.size + len(req.body)
            if parts and size + length > MAX_BATCH_BYTES:
                break
            parts.append(req)
            size += length
            end += 1
        base = self._next_seqs(len(parts))
        pack = codec.HDR.pack
        hsize = codec.HDR.size
        # Only the last message asks for an ACK: the kernel answers a refused message with an
        # error whatever its flags, and handles a datagram's messages in order, so the last
        # one's ACK closes the chunk. One ACK per message cost one recv each (a GET with ACK
        # two: its answer and its ACK), each a system call (10-20 us in User-mode Linux).
        last = len(parts) - 1
        datagram = b"".join(
            pack(hsize + len(r.body), r.type,
                 r.flags | k.NLM_F_ACK if i == last else r.flags & ~k.NLM_F_ACK,
                 base + 1 + i, 0) + r.body
            for i, r in enumerate(parts)
        )
        sock.send(datagram)
        return end, base

    def _read_acks(
        self,
        sock: socket.socket,
        requests: Sequence[codec.Request],
        start: int,
        end: int,
        base: int,
        results: list[XfrmError | None],
        replies: dict[int, PolicyInfo | SAInfo] | None = None,
    ) -> None:
        last = end - start - 1  # its ACK (or error) is the chunk's last answer: see _send_chunk
        unpack = codec.HDR.unpack_from
        done = False
        while not done:
            for off, stop, view in self._datagrams(sock, replies is not None):
                while off + codec.HDR.size <= stop:
                    length, msg_type, flags, seq, _ = unpack(view, off)
                    k_ = seq - base - 1
                    if msg_type == k.NLMSG_ERROR and 0 <= k_ <= last:
                        err, detail = codec.ack_error(view, off, length, flags)
                        if err:
                            req = requests[start + k_]
                            results[start + k_] = xfrm_error(req.op, err, req.what, detail)
                        done = done or k_ == last
                    elif (msg_type == k.XFRM_MSG_NEWPOLICY and replies is not None
                          and 0 <= k_ <= last):
                        replies[start + k_] = codec.decode_policy(
                            view, off + codec.HDR.size, off + length)
                    elif (msg_type == k.XFRM_MSG_NEWSA and replies is not None
                          and 0 <= k_ <= last):
                        replies[start + k_] = codec.decode_sa(
                            view, off + codec.HDR.size, off + length)
                    off += (length + 3) & ~3
                    if length < codec.HDR.size:
                        break

    def _datagrams(self, sock: socket.socket, many: bool
                   ) -> Iterator[tuple[int, int, memoryview]]:
        """The next datagram(s): (start, end, view). A look-up batch is answered one datagram
        per entry, so `many` reads all that are queued in one recvmmsg (ipsec/xfrm/mrecv.py);
        an ACK-only batch has one datagram per chunk, read with recv."""
        if many:
            if self._multi is None:
                self._multi = mrecv.Receiver()
            view = self._multi.view
            for off, length in self._multi.receive(sock):
                yield off, off + length, view
        else:
            yield 0, sock.recv_into(self._buf), self._view

    def _one(self, request: codec.Request) -> None:
        (error,) = self.batch([request])
        if error is not None:
            raise error

    def add_sa(self, sa: SA) -> None:
        self._one(codec.new_sa(sa))

    def delete_sa(self, sa_id: SAId) -> None:
        self._one(codec.del_sa(sa_id))

    def add_policy(self, policy: Policy) -> None:
        self._one(codec.new_policy(policy))

    def delete_policy(self, sel: Selector, direction: Dir) -> None:
        self._one(codec.del_policy(PolicyId(direction, sel)))

    def _dump(self, msg_type: int, decode: Callable[..., T], user: int | None,
              complete: bool = True) -> list[T]:
        """Every record, from a dump the kernel did not interrupt (NLM_F_DUMP_INTR: the table
        changed meanwhile, records may be missing or repeated). After DUMP_ATTEMPTS such
        dumps it raises (EINTR): a caller deciding what to delete must never act on a partial
        answer. `complete=False` (flush, which dumps until nothing is left) takes the last."""
        for _ in range(DUMP_ATTEMPTS):
            records, interrupted = self._dump_once(msg_type, decode, user)
            if not interrupted:
                return records
        if complete:
            raise XfrmError("dump", errno.EINTR, _DUMP_WHAT[msg_type],
                            f"interrupted {DUMP_ATTEMPTS} times: the table kept changing")
        return records

    def _dump_once(
        self, msg_type: int, decode: Callable[..., T], user: int | None
    ) -> tuple[list[T], bool]:
        answer = k.XFRM_MSG_NEWSA if msg_type == k.XFRM_MSG_GETSA else k.XFRM_MSG_NEWPOLICY
        out: list[T] = []
        interrupted = False
        sock = self._socket()
        seq = self._next_seqs(1) + 1
        sock.send(codec.dump_request(msg_type, seq))
        view = self._view
        while True:
            n = sock.recv_into(self._buf)
            off = 0
            while off + codec.HDR.size <= n:
                length, mtype, flags, mseq, _ = codec.HDR.unpack_from(view, off)
                if mseq == seq:
                    if mtype == k.NLMSG_DONE:
                        return out, interrupted or bool(flags & NLM_F_DUMP_INTR)
                    if mtype == k.NLMSG_ERROR:
                        err, detail = codec.ack_error(view, off, length, flags)
                        raise xfrm_error("dump", err, _DUMP_WHAT[msg_type], detail)
                    interrupted |= bool(flags & NLM_F_DUMP_INTR)
                    body = off + codec.HDR.size
                    if mtype == answer and (
                        user is None or codec.selector_user(view, body) == user
                    ):
                        out.append(decode(view, body, off + length))
                off += (length + 3) & ~3

    def states(self, user: int | None = None) -> list[SAInfo]:
        """All SAs, or those whose selector carries marker `user`."""
        return self._dump(k.XFRM_MSG_GETSA, codec.decode_sa, user)

    def policies(self, user: int | None = None) -> list[PolicyInfo]:
        """All policies, or those whose selector carries marker `user`."""
        return self._dump(k.XFRM_MSG_GETPOLICY, codec.decode_policy, user)

    def count_states(self, user: int | None = None) -> int:
        return len(self._dump(k.XFRM_MSG_GETSA, _nothing, user))

    def count_policies(self, user: int | None = None) -> int:
        return len(self._dump(k.XFRM_MSG_GETPOLICY, _nothing, user))

    def flush(self, user: int) -> Flushed:
        """Remove every policy, then every SA, whose selector carries marker `user`.

        Policies go first so that no policy is ever left without its SA. Dump and delete
        repeat until a dump finds none: entries added meanwhile, or a dump the kernel
        interrupted, do not leave anything of ours behind.
        """
        policies = self._flush(
            lambda u: self._dump(k.XFRM_MSG_GETPOLICY, codec.decode_policy, u, complete=False),
            lambda p: codec.del_policy(p.id), user)
        states = self._flush(
            lambda u: self._dump(k.XFRM_MSG_GETSA, codec.decode_sa, u, complete=False),
            lambda s: codec.del_sa(s.id), user)
        return Flushed(states=states, policies=policies)

    def _flush(
        self,
        dump: Callable[[int], list],
        delete: Callable[[object], codec.Request],
        user: int,
    ) -> int:
        removed = 0
        while True:
            found = dump(user)
            if not found:
                return removed
            results = self.batch([delete(x) for x in found])
            for error in results:
                if error is not None and not isinstance(error, XfrmNotFound):
                    raise error
            done = sum(1 for e in results if e is None)
            if not done:
                raise XfrmError("flush", errno.EAGAIN, f"{len(found)} entries marked {user}")
            removed += done


def _nothing(_view: memoryview, _start: int, _end: int) -> None:
    return None


_DUMP_WHAT = {k.XFRM_MSG_GETSA: "SAs", k.XFRM_MSG_GETPOLICY: "policies"}
