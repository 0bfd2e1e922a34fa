"""The P-CSCF's KEMI script with a way to die: for fault injection in the e2e tests only.

Kamailio loads it instead of kemi/pcscf.py (`KEMI_SCRIPT='"<this file>"'`). A worker that
finds the file `fault-step` in Kamailio's working directory (the test's run dir, `-w`) when
`ipsec_create` reaches the step the file names kills itself with SIGKILL there, as an OOM
kill or a crash would, and the file goes so that only one worker dies:

  after-lease     the store transaction of the challenge is committed (tunnel staged), no SA yet
  after-sas       the 4 SAs are in the kernel, no policy yet
  after-policies  SAs and policies are in, the 401 has not left
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kemi import pcscf  # noqa: E402  (first: it finds the venv's packages, pyroute2's)
from ipsec import tunnel  # noqa: E402
from ipsec.store.store import Store  # noqa: E402

FAULT_FILE = "fault-step"


def _die_at(step: str) -> None:
    try:
        with open(FAULT_FILE) as f:
            wanted = f.read().strip()
    except OSError:
        return
    if wanted == step:
        os.remove(FAULT_FILE)
        os.kill(os.getpid(), signal.SIGKILL)


_challenge = Store.challenge


def _challenge_then_maybe_die(self, *args, **kwargs):
    done = _challenge(self, *args, **kwargs)
    _die_at("after-lease")
    return done


Store.challenge = _challenge_then_maybe_die


class _DyingXfrm:
    """Wraps the Xfrm `tunnel.install` is given: dies after its first (SAs) or second
    (policies) batch."""

    def __init__(self, x) -> None:
        self._x = x
        self._batches = 0

    def batch(self, requests, *args, **kwargs):
        out = self._x.batch(requests, *args, **kwargs)
        self._batches += 1
        _die_at({1: "after-sas", 2: "after-policies"}.get(self._batches, ""))
        return out

    def __getattr__(self, name):
        return getattr(self._x, name)


_install = tunnel.install


def _install_maybe_dying(x, t, *args, **kwargs):
    return _install(_DyingXfrm(x), t, *args, **kwargs)


tunnel.install = _install_maybe_dying

mod_init = pcscf.mod_init
