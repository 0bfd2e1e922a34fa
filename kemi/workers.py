"""The processes and open files that kamailio.cfg's listen sockets make, checked at start.

Kamailio binds every socket in its main process, then forks the workers one by one, keeping
one end of a socket pair per process. With many protected sockets the main process runs out
of open files part-way through (`socketpair failed: Too many open files`, `Cannot fork`) and
Kamailio exits with nothing served; 1024, the usual default soft limit (systemd's too), is
reached at about 125 port pairs with 2 workers per socket. So mod_init works out what the
sockets and workers need before the fork, raises the soft limit when the hard one allows,
and otherwise refuses to start with the numbers and what to change.
"""
from __future__ import annotations

import gc
import resource
from dataclasses import dataclass
from typing import Callable

from ipsec.params import Params

OTHER_PROCESSES = 16  # main, TCP main and workers, timers, rtimer: 8 with kamailio.cfg
SPARE_FILES = 64  # log, SQLite, netlink and the like (6 measured in the main process)
KAMAILIO_CHILDREN = 8  # Kamailio's `children` when a cfg does not set it
TCP_ROOM = 1024  # when raising: room left for phones' TCP connections (TCP main holds them)


class StartError(Exception):
    """Kamailio must not start: it would run out of open files while forking its workers."""


@dataclass(frozen=True)
class Workers:
    """The UDP/TCP listen sockets and worker processes of kamailio.cfg for these values."""

    protected_sockets: int  # UDP sockets (the same number of TCP ones)
    plain_sockets: int  # port 5060 and the core socket, UDP (the same number of TCP ones)
    children: int  # CHILDREN: workers per port 5060 UDP socket
    ipsec_children: int  # IPSEC_CHILDREN: workers per protected UDP socket

    @classmethod
    def from_defines(cls, params: Params, get_def: Callable[[str], str]) -> "Workers":
        families = bool(params.ipsec_listen_addr) + bool(params.ipsec_listen_addr6)
        ports = len(set(params.client_ports) | set(params.server_ports))
        return cls(protected_sockets=ports * families,
                   plain_sockets=1 + bool(get_def("PCSCF_IP6")) + bool(get_def("CORE_IP")),
                   children=_number(get_def, "CHILDREN"),
                   ipsec_children=_number(get_def, "IPSEC_CHILDREN"))

    @property
    def processes(self) -> int:
        return (self.protected_sockets * self.ipsec_children + self.plain_sockets * self.children
                + OTHER_PROCESSES)

    @property
    def open_files(self) -> int:
        """What the main process holds when it forks its last worker: every listen socket
        (UDP and TCP), one end of a socket pair per process, and a few more."""
        return 2 * (self.protected_sockets + self.plain_sockets) + self.processes + SPARE_FILES


def ensure_open_files(workers: Workers, log: Callable[[str], object],
                      getrlimit=None, setrlimit=None) -> None:
    """Raise the soft open files limit to what the workers need (and room for TCP
    connections) if the hard limit allows; StartError when it does not."""
    getrlimit, setrlimit = getrlimit or resource.getrlimit, setrlimit or resource.setrlimit
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    need = workers.open_files
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need + TCP_ROOM if hard == resource.RLIM_INFINITY else min(hard, need + TCP_ROOM)
    if target < need:
        raise StartError(
            f"open files: {workers.protected_sockets} protected and {workers.plain_sockets} "
            f"port 5060 UDP sockets (as many TCP) with {workers.processes} processes need about "
            f"{need} open files, and the limit is {soft} (hard {hard}): Kamailio would fail to "
            f"fork part-way. Raise the limit (LimitNOFILE={need + TCP_ROOM} in the systemd unit, "
            f"`ulimit -n`, or open_files_limit in kamailio.cfg), or use fewer port pairs "
            f"(IPSEC_MAX_CONNECTIONS: all phones share them, a few suffice)")
    setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    log(f"ims-ipsec: open files limit raised from {soft} to {target}: {workers.processes} "
        f"processes and {2 * (workers.protected_sockets + workers.plain_sockets)} listen "
        f"sockets need about {need}\n")


def freeze_for_fork() -> None:
    """Last thing before Kamailio forks its workers: what the main process built (modules,
    the routing objects) moves out of the cyclic GC's reach, so that no child's collection
    writes into those objects' headers and copies their pages one by one (Python's own
    advice for servers that fork). Measured with `make soak` (8,000 cycles): without it,
    the sweep's process went from 4.3 to 9.8 MB PSS while its RSS stayed at 23.4-23.8 MB:
    no new memory, the same pages copied out of the image it shares with the other
    processes; with it, 3.9 to 6.4 MB, level over the second half of the run."""
    gc.collect()
    gc.freeze()


def _number(get_def: Callable[[str], str], name: str) -> int:
    raw = (get_def(name) or "").strip()
    if not raw:  # a cfg without the define: Kamailio's own default for `children`
        return KAMAILIO_CHILDREN
    try:
        value = int(raw, 0)
    except ValueError:
        raise StartError(f"{name}: {raw!r} is not a number of worker processes") from None
    if value < 1:
        raise StartError(f"{name}: {value} is not a number of worker processes (1 or more)")
    return value
