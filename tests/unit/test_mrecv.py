"""recvmmsg's buffer (ipsec/xfrm/mrecv.py) belongs to one process: Kamailio forks its workers
from a main process that may have looked entries up already (start-up), and two workers
reading their answers into one shared buffer would read each other's."""
from __future__ import annotations

import os

from ipsec.xfrm import mrecv


def test_a_forked_child_writes_its_own_copy_of_the_buffer():
    r = mrecv.Receiver(count=2, size=4096)
    r.view[0] = 1
    pid = os.fork()
    if pid == 0:  # the child: what a worker's recvmmsg would do to the buffer it inherited
        r.view[0] = 2
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert r.view[0] == 1, "the child's write reached the parent: the mapping is shared"
