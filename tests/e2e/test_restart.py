"""Kamailio restarted between two protected requests: no re-registration needed."""
from __future__ import annotations

import os
import re
import signal

import esp_net
import invariant
from checks import through_esp
from esp_net import run
from pcscf_net import Phone, pcscf_policy_count, pcscf_states
from sip import token


def _message(phone: Phone) -> None:
    phone.request("MESSAGE", "sip:bob@ims.test", call_id=token(), to="<sip:bob@ims.test>")
    phone.wait_reply(200, "MESSAGE")


def test_restart_keeps_tunnels(link, scscf, kamailio):
    phone = Phone(link, scscf, user="survivor")
    phone.full_registration()
    _message(phone)
    before = sorted(s["spi"] for s in pcscf_states(link))
    kamailio.stop()
    kamailio.start()
    assert sorted(s["spi"] for s in pcscf_states(link)) == before
    assert pcscf_policy_count(link) == 4
    with through_esp(phone, "sa1", "sa3"):
        _message(phone)


def test_restart_drops_a_tunnel_whose_policies_are_gone_and_its_phone_registers_again(
        link, scscf, kamailio):
    """What a kill between the SA batch and the policy batch leaves: a live tunnel's 4 SAs
    without their policies (the kernel would take the phone's cleartext). Real Kamailio's
    start-up drops it, logs why, and leaves store and kernel in agreement; the phone
    registers again and its requests go through ESP."""
    phone = Phone(link, scscf, user="halfway")
    phone.full_registration()
    t = phone.tunnel
    kamailio.stop()
    ports = {(sport, dport) for _, sport, _, dport, _, _ in esp_net.ue_flows(t)}
    doomed = [(index, direction) for sport, dport, direction, index in re.findall(
        r"^src \S+ dst \S+ sport (\d+) dport (\d+).*?\n\s*dir (\w+) .*?index (\d+)",
        run("ip", "-n", link.pc, "-s", "xfrm", "policy"), re.M) if (int(sport), int(dport)) in ports]
    assert len(doomed) == 4, doomed
    run("ip", "-n", link.pc, "-batch", "-", stdin="".join(
        f"xfrm policy delete index {index} dir {direction}\n" for index, direction in doomed))
    kamailio.start()
    assert re.search(rf"start: tunnel spi-c={t.spi_pc} of {re.escape(t.ue)} is not whole in the "
                     r"kernel \(.*policy in missing.*\); dropped", kamailio.log())
    assert not {t.spi_pc, t.spi_ps, t.spi_uc, t.spi_us} & {s["spi"] for s in pcscf_states(link)}
    invariant.assert_holds(link.pc, kamailio.store_path)
    phone.drop_sas(t)
    phone.tunnel = None
    phone.new_offer()
    phone.full_registration()
    with through_esp(phone, "sa1", "sa3"):
        _message(phone)


def test_kill_9_of_all_of_kamailio_mid_registration(link, scscf, kamailio):
    """kill -9 of every Kamailio process while one phone is registered and another has only
    had its 401 (its tunnel pending, its SAs in both kernels): after a restart store and
    kernel agree (nothing of the half-done registration orphaned, nothing missing), the
    registered phone is served through its SAs without registering again, and the other
    phone, starting over with a new offer, registers and is served too."""
    steady = Phone(link, scscf, user="steady9")
    steady.full_registration()
    halfway = Phone(link, scscf, user="halfway9")
    halfway.challenge(protected=False)
    os.killpg(kamailio.proc.pid, signal.SIGKILL)
    kamailio.proc.wait(timeout=10)
    kamailio.stop(check=False)  # whatever outlived the signal
    kamailio.start()
    invariant.assert_holds(link.pc, kamailio.store_path)
    with through_esp(steady, "sa1", "sa3"):
        _message(steady)
    halfway.drop_sas(halfway.pending)
    halfway.pending = None
    halfway.new_offer()
    halfway.full_registration()
    with through_esp(halfway, "sa1", "sa3"):
        _message(halfway)
    invariant.assert_holds(link.pc, kamailio.store_path)
