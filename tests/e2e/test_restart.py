"""Kamailio restarted between two protected requests: no re-registration needed."""
from __future__ import annotations

from checks import through_esp
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
