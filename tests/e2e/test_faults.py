"""A worker killed (SIGKILL) in the middle of `ipsec_create`, on real Kamailio + ESP.

The fault comes from tests/e2e/fault_script.py, the real KEMI script with a way to die at
one step. Kamailio ends itself when one of its workers dies by a signal, so each case is
also a restart: afterwards store and kernel must agree exactly (tests/kernel/invariant.py:
nothing of the half-done challenge orphaned, no lease leaked), the phone registered before
is served through its SAs without registering again, and the phone whose challenge died
registers from the start.
"""
from __future__ import annotations

import time
from pathlib import Path

import invariant
import pytest
from checks import through_esp
from pcscf_net import Kamailio, Phone
from sip import token

SCRIPT = Path(__file__).resolve().parent / "fault_script.py"


@pytest.fixture(scope="module")
def kamailio(link, scscf, tmp_path_factory):
    k = Kamailio(link, tmp_path_factory.mktemp("kamailio-faults"), KEMI_SCRIPT=f'"{SCRIPT}"')
    k.start()
    yield k
    k.stop_and_check()


def _message(phone: Phone) -> None:
    phone.request("MESSAGE", "sip:bob@ims.test", call_id=token(), to="<sip:bob@ims.test>")
    phone.wait_reply(200, "MESSAGE")


@pytest.mark.parametrize("step", ["after-lease", "after-sas", "after-policies"])
def test_a_worker_killed_inside_ipsec_create(link, scscf, kamailio, step):
    steady = Phone(link, scscf, user=f"steady-{step}")
    steady.full_registration()
    deaths = kamailio.log().count("exited by a signal 9")
    fault = kamailio.run_dir / "fault-step"
    fault.write_text(step)
    victim = Phone(link, scscf, user=f"victim-{step}")
    victim.register(protected=False)  # its 401 reaches a worker that dies at `step`
    deadline = time.monotonic() + 20
    while fault.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not fault.exists(), f"no worker reached {step}"
    time.sleep(1)
    kamailio.stop(check=False)  # what is left of it
    # the worker died, and Kamailio with it
    assert kamailio.log().count("exited by a signal 9") == deaths + 1
    kamailio.start()
    invariant.assert_holds(link.pc, kamailio.store_path)
    with through_esp(steady, "sa1", "sa3"):
        _message(steady)
    victim.new_offer()
    victim.full_registration()
    with through_esp(victim, "sa1", "sa3"):
        _message(victim)
    invariant.assert_holds(link.pc, kamailio.store_path)
