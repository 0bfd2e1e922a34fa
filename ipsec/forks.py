"""Which side of a fork this process is on, without a system call per question.

Every per-process resource (store connection, netlink socket, lock descriptor) must be opened
again in a forked child, never shared with its parent. Asking `os.getpid()` on every use was
a system call per store query, and system calls are what User-mode Linux, and any busy
P-CSCF, pays most for. Python runs `os.register_at_fork` hooks in the child of os.fork and of
Kamailio's fork (app_python3 calls PyOS_AfterFork_Child in every worker), so a counter they
bump tells each resource whether it was opened in this process.
"""
from __future__ import annotations

import os

_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_forked)


def generation() -> int:
    """Changes in a child after each fork; equal to the parent's value before it."""
    return _generation
