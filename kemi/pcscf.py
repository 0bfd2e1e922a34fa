"""The P-CSCF routing script (Kamailio app_python3, KEMI): REGISTER with sec-agree, calls.

Loaded by kamailio.cfg. It finds this checkout's code and venv from its own location, so
Kamailio can start with a clean environment from any directory.
"""
import functools
import os
import site
import sys
import time

_HOME = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
site.addsitedir(os.path.join(_HOME, ".venv", "lib", "python%d.%d" % sys.version_info[:2], "site-packages"))
if _HOME not in sys.path:
    sys.path.insert(0, _HOME)

import KSR  # noqa: E402

from kemi.imports import defer_pyroute2_init  # noqa: E402

defer_pyroute2_init()  # before ipsec.xfrm imports pyroute2.netlink: a smaller heap to fork

from ipsec.logtext import clean  # noqa: E402
from ipsec.module import Module, ModuleError  # noqa: E402
from ipsec.params import ParamError  # noqa: E402
from kemi.core import Core, CoreError  # noqa: E402
from kemi.message import KsrMessage  # noqa: E402
from kemi.overload import Overload  # noqa: E402
from kemi.replies import drop as drop_reply, stray_reply  # noqa: E402
from kemi.routing import Routing, refuse_challenge  # noqa: E402
from kemi.stats import KsrCounters, metrics_request  # noqa: E402
from kemi.workers import StartError, Workers, ensure_open_files, freeze_for_fork  # noqa: E402

DOMAIN = "location"


def mod_init():
    """Main process, before the fork: read the defines, reconcile kernel and store."""
    started = time.monotonic()
    try:
        module = Module.from_defines(KSR.kx.get_def, log=KSR, counters=KsrCounters())
    except (ParamError, ModuleError) as e:
        KSR.err("ims-ipsec: refusing to start: %s\n" % e)
        return None
    try:
        ensure_open_files(Workers.from_defines(module.params, KSR.kx.get_def), KSR.info)
        module.startup()
    except (ModuleError, StartError) as e:
        KSR.err("ims-ipsec: refusing to start: %s\n" % e)
        return None
    finally:
        module.close()  # every worker opens its own store connection and netlink socket
    try:
        core = Core.from_defines(KSR.kx.get_def)
        overload = Overload.from_defines(KSR.kx.get_def)
    except (CoreError, ParamError) as e:
        KSR.err("ims-ipsec: refusing to start: %s\n" % e)
        return None
    KSR.info("ims-ipsec: %s\n" % core.trust_line())
    callbacks = kamailio(Routing(module, KSR.kx.get_def, DOMAIN, core, overload), started)
    freeze_for_fork()
    return callbacks


def _guarded(on_error):
    """No Python exception may reach Kamailio: log it, then answer as `on_error` says."""

    def wrap(callback):
        @functools.wraps(callback)
        def run(self, *args):
            try:
                return callback(self, *args)
            except Exception as e:  # noqa: BLE001
                KSR.err("ims-ipsec: %s: internal error %s: %s\n"
                        % (callback.__name__, type(e).__name__, clean(e)))
                on_error()
                return -1
        return run
    return wrap


def _fail_request():
    KSR.sl.send_reply(500, "Server Internal Error")


def _fail_challenge():
    refuse_challenge()  # the challenge carries CK/IK: it must not leave as it came


class kamailio:
    """The callbacks Kamailio looks up by name; every one delegates to `Routing`."""

    def __init__(self, routing, started=None):
        self.r = routing
        self.started = started  # mod_init's clock, until the start-up is announced

    def child_init(self, rank):
        """A SIP worker opens what it will need now, not while its first phone waits."""
        if rank > 0:
            try:
                self.r.m.warm()
            except Exception as e:  # noqa: BLE001 - it opens again on first use
                KSR.err("ims-ipsec: worker %d: could not open the store or netlink: %s\n"
                        % (rank, e))
        return 0

    @_guarded(_fail_request)
    def ksr_request_route(self, msg):
        return self.r.request(KsrMessage())

    @_guarded(drop_reply)
    def ksr_reply_route(self, msg):
        return stray_reply(KsrMessage(), self.r)

    @_guarded(_fail_challenge)
    def ksr_register_reply(self, msg):
        return self.r.register_reply(KsrMessage())

    @_guarded(lambda: None)
    def ksr_register_failure(self, msg):
        return self.r.register_failure()

    @_guarded(lambda: None)
    def ksr_xhttp_event(self, msg, evname=None):
        """xhttp (loaded when PROM_PORT is defined): the Prometheus scrape."""
        return metrics_request(KSR.kx.get_def)

    @_guarded(lambda: None)
    def ksr_ipsec_sweep(self, msg, evname=None):
        if self.started is not None:
            # rtimer's process is forked after every UDP worker: the first sweep marks the
            # end of the start-up (with many port pairs it takes a while, see README)
            KSR.info("ims-ipsec: started: every UDP worker is up, %.1f s after mod_init\n"
                     % (time.monotonic() - self.started))
            self.started = None
        self.r.sweep()
        return 1
