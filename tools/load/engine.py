"""One event loop for every phone and the S-CSCF stub: epoll over all their sockets, a heap of
retransmission timers, and the phones' XFRM requests batched per loop turn.

Why one loop and no threads: the generator shares User-mode Linux's single CPU with the
Kamailio it measures; a thread per phone would spend that CPU on switching, and the ratio to
the relay is only meaningful if the generator costs little per message.
"""
from __future__ import annotations

import errno
import heapq
import itertools
import math
import resource
import secrets
import select
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ipsec.xfrm import Request, Xfrm, XfrmError
from ipsec.xfrm.model import SA, SAId

if TYPE_CHECKING:
    from .phone import Phone
    from .scscf import Scscf

Handler = Callable[[int, bytes, tuple], None]
XfrmDone = Callable[[str | None], None]
IDLE_WAIT = 0.2  # seconds the loop blocks at most: phase ends are noticed this fast
WATCH_EVERY = 1.0  # seconds between two calls of the watchdog
STRAY = "stray response: "


@dataclass
class PhaseResult:
    """What a phase measured. `busy` runs from the first request to the last success, so
    phones that end in a timeout lengthen it only by the slots they held, not by the wait
    for their deadline after everyone else finished (`wall` includes that)."""

    name: str
    attempted: int
    latencies: dict[int, float] = field(default_factory=dict)  # phone index -> seconds
    failures: Counter[str] = field(default_factory=Counter)
    wall: float = 0.0
    busy: float = 0.0
    retransmits: int = 0
    notes: Counter[str] = field(default_factory=Counter)  # what happened besides the steps
    cpu: float = 0.0  # the generator's own CPU seconds (user + system) during the phase
    timed: bool = True
    # Kamailio's processes' CPU seconds during the phase, (user, system), when measured
    server_cpu: tuple[float, float] | None = None
    server_faults: int | None = None  # their page faults during the phase, when measured

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def strays(self) -> int:
        """Responses that matched no transaction in progress: late, or duplicates."""
        return sum(n for kind, n in self.notes.items() if kind.startswith(STRAY))

    @property
    def rate(self) -> float:
        return self.ok / self.busy if self.busy > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the successful latencies, in seconds (0 if none)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies.values())
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    def server_ms(self) -> str:
        """', Kamailio 1.2 + 2.3 ms CPU' (user + system per successful step), if measured."""
        if self.server_cpu is None or not self.ok:
            return ""
        user, system = self.server_cpu
        faults = ("" if self.server_faults is None
                  else f", {self.server_faults / self.ok:.1f} page faults")
        return (f", Kamailio {1000 * user / self.ok:.2f} + {1000 * system / self.ok:.2f} ms CPU"
                f"{faults}")

    @property
    def cpu_share(self) -> float:
        """How much of the phase's wall time the generator itself was on the CPU."""
        return self.cpu / self.wall if self.wall > 0 else 0.0


def _nothing() -> None:
    return None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def xfrm_cause(error: XfrmError) -> str:
    """'add SA: EEXIST': the kernel's refusal without the SPI or ports, so causes group."""
    kind = "SA" if isinstance(error.what, (SA, SAId)) else "policy"
    return f"{error.op} {kind}: {errno.errorcode.get(error.errno, error.errno)}"


class Engine:
    def __init__(self, pcscf: str, timeout: float, xfrm: Xfrm) -> None:
        self.pcscf = pcscf
        self.timeout = timeout
        self.run_id = secrets.token_hex(3)
        self.now = time.monotonic
        # Read once per turn of the loop, right after the wait: a clock read is a system call,
        # and system calls are what User-mode Linux makes expensive (~9 us each).
        self.clock = self.now()
        self.stub: Scscf | None = None  # set once its socket is watched
        # Called every second of a phase; raises RuntimeError when the run is pointless (the
        # proxy under test died: every phone would wait for its timeout).
        self.watchdog: Callable[[], None] = _nothing
        self._ep = select.epoll()
        self._handlers: dict[int, tuple[Handler, int, socket.socket]] = {}
        self._timers: list[tuple[float, int, Phone, int]] = []
        self._seq = itertools.count()
        self._xfrm = xfrm
        self._xfrm_queue: list[tuple[list[Request], XfrmDone]] = []
        self._active = 0
        self._result = PhaseResult("before the first phase", 0)
        self._last_ok = 0.0

    def close(self) -> None:
        self._ep.close()

    # -- what phones and the stub ask of the loop -------------------------------------------
    def watch(self, sock: socket.socket, handler: Handler, port: int) -> None:
        sock.setblocking(False)
        self._ep.register(sock.fileno(), select.EPOLLIN)
        self._handlers[sock.fileno()] = (handler, port, sock)

    def schedule(self, when: float, phone: Phone, token: int) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), phone, token))

    def xfrm(self, requests: list[Request], done: XfrmDone) -> None:
        """Queue the phone's requests; they go out with everyone else's at the next turn of the
        loop, and `done` gets None or the first refusal."""
        self._xfrm_queue.append((requests, done))

    def note(self, kind: str) -> None:
        """Count something worth reporting that is not a step's outcome."""
        self._result.notes[kind] += 1

    def retransmitted(self) -> None:
        self._result.retransmits += 1

    def finish(self, phone: Phone, cause: str | None) -> None:
        """The phone's step is over: a latency, or a failure by cause."""
        if not phone.in_phase:
            return
        phone.in_phase = False
        self._active -= 1
        if cause is None:
            self._last_ok = self.clock
            self._result.latencies[phone.idx] = self.clock - phone.t_start
        else:
            self._result.failures[cause] += 1

    # -- phases -------------------------------------------------------------------------------
    def run_phase(self, name: str, phones: Iterable[Phone], start: Callable[[Phone], None],
                  in_flight: int, timed: bool = True) -> PhaseResult:
        """Every phone through `start`'s step, at most `in_flight` at a time."""
        todo = deque(phones)
        result = self._result = PhaseResult(name, len(todo), timed=timed)
        cpu = _cpu()
        t0 = self._last_ok = self.clock = self.now()
        next_watch = t0 + WATCH_EVERY
        while todo or self._active:
            if self.clock >= next_watch:
                self.watchdog()
                next_watch = self.clock + WATCH_EVERY
            if self._active < in_flight and todo:
                self.clock = self.now()
                while self._active < in_flight and todo:
                    phone = todo.popleft()
                    self._active += 1
                    phone.in_phase = True
                    phone.t_start = self.clock
                    start(phone)
            self._turn()
        result.wall = self.now() - t0
        result.busy = self._last_ok - t0
        result.cpu = _cpu() - cpu
        return result

    def _turn(self) -> None:
        if self._xfrm_queue:
            self._flush_xfrm()
        timers = self._timers
        wait = IDLE_WAIT
        if timers:
            wait = min(max(timers[0][0] - self.clock, 0.0), IDLE_WAIT)
        ready = self._ep.poll(wait)
        now = self.clock = self.now()
        handlers = self._handlers
        for fd, _ in ready:
            handler, port, sock = handlers[fd]
            try:
                data, addr = sock.recvfrom(65535)
            except OSError:
                continue
            handler(port, data, addr)
        while timers and timers[0][0] <= now:
            _, _, phone, token = heapq.heappop(timers)
            if phone.waiting and phone.token == token:
                phone.on_timer(now)

    def _flush_xfrm(self) -> None:
        queue, self._xfrm_queue = self._xfrm_queue, []
        results = self._xfrm.batch([r for requests, _ in queue for r in requests])
        i = 0
        for requests, done in queue:
            errors = [e for e in results[i:i + len(requests)] if e is not None]
            i += len(requests)
            done(xfrm_cause(errors[0]) if errors else None)
