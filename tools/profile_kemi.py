"""The P-CSCF's KEMI script under cProfile, for `make profile` (never for production).

Kamailio loads it instead of kemi/pcscf.py (`-A 'KEMI_SCRIPT="<this file>"'`, with the
define PROFILE_DIR naming a writable directory, else RUN_DIR/profile). Each callback of the real script runs under
one cProfile.Profile per process (or, with the define PROFILE_TIMES_ONLY, only timed: the
profiler's own cost is large where system calls are dear, as in User-mode Linux); every worker writes its statistics to PROFILE_DIR/<pid>.prof
every few calls (Kamailio's children do not run Python's exit hooks), and `tools/profile_run.py`
adds them up.
"""
import cProfile
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import KSR  # noqa: E402

from kemi import pcscf  # noqa: E402

DUMP_EVERY = 50
# CPU time of this process (user + system), not wall time: on a machine shared with other
# workers and the load, waiting for the CPU must not count as the code's cost.
_profile = cProfile.Profile(time.process_time)
_profiling = True
_calls = 0
_busy = 0.0
_cpu = 0.0
_by_callback: dict = {}  # name -> [calls, seconds]


def _out_dir() -> str:
    """PROFILE_DIR, else RUN_DIR/profile (make load KEEP=DIR brings the run dir home)."""
    out = (KSR.kx.get_def("PROFILE_DIR") or "").strip('"')
    if not out:
        out = os.path.join(KSR.kx.get_def("RUN_DIR").strip('"'), "profile")
        os.makedirs(out, exist_ok=True)
    return out


def _dump() -> None:
    path = os.path.join(_out_dir(), "%d.prof" % os.getpid())
    _profile.dump_stats(path + ".tmp")
    with open(path + ".busy", "w") as f:
        f.write("%d %.6f %.6f\n" % (_calls, _busy, _cpu))
        for name, (calls, took) in sorted(_by_callback.items()):
            f.write("%s %d %.6f\n" % (name, calls, took))
    os.rename(path + ".tmp", path)


def _profiled(name, callback):
    def run(*args):
        global _calls, _busy, _cpu
        t0, c0 = time.perf_counter(), time.process_time()
        if _profiling:
            _profile.enable()
        try:
            return callback(*args)
        finally:
            if _profiling:
                _profile.disable()
            took = time.perf_counter() - t0
            _busy += took
            _cpu += time.process_time() - c0
            entry = _by_callback.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += took
            _calls += 1
            if _calls % DUMP_EVERY == 0 or name == "ksr_ipsec_sweep":
                _dump()
    return run


class _Profiled:
    """The real `kamailio` object with every ksr_* callback profiled."""

    def __init__(self, real) -> None:
        self._real = real

    def child_init(self, rank):
        return self._real.child_init(rank)

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        return _profiled(name, attr) if name.startswith("ksr_") else attr


def mod_init():
    global _profiling
    _profiling = not KSR.kx.get_def("PROFILE_TIMES_ONLY")
    real = pcscf.mod_init()
    if real is None:
        return None
    app = _Profiled(real)
    for name in dir(real):  # app_python3 looks callbacks up on the object: make them real
        if name.startswith("ksr_"):
            setattr(app, name, _profiled(name, getattr(real, name)))
    return app
