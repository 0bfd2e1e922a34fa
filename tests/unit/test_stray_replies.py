"""Replies that match no transaction (issue 10, finding 5), through kemi/pcscf.py's reply route.

Kamailio forwards such a reply statelessly along its Via after the reply route returns. Before,
the reply route did nothing: a late 401 from the S-CSCF (its REGISTER's transaction gone after
fr_timer or a restart) reached the phone with ck= and ik= in clear text.
"""
from __future__ import annotations

import pytest

import KSR
from scenario import CORE, UE, challenge, register, reply_to, request


@pytest.fixture
def app(pcscf):
    import kemi.pcscf
    return kemi.pcscf.kamailio(pcscf.routing)


def arrives(raw_reply: str, request_raw: str, in_transaction: bool):
    return KSR._load_reply(raw_reply, request_raw, source=(CORE, 5060, "udp"),
                           in_transaction=in_transaction)


def test_a_late_401_with_keys_is_dropped_never_forwarded(app):
    reg = register()
    rec = arrives(reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge()}",)),
                  reg, in_transaction=False)
    assert app.ksr_reply_route(None) == 0
    assert rec.dropped and "matches no transaction: dropped" in rec.log_text()
    assert "CK/IK" in rec.log_text() and "0123456789abcdef" not in rec.log_text()


@pytest.mark.parametrize("code", [200, 403, 500])
def test_any_stray_reply_to_register_is_dropped(app, code):
    reg = register()
    rec = arrives(reply_to(reg, code, "Whatever"), reg, in_transaction=False)
    app.ksr_reply_route(None)
    assert rec.dropped


@pytest.mark.parametrize("header", ["WWW-Authenticate", "Proxy-Authenticate"])
def test_a_stray_challenge_of_another_method_with_keys_is_dropped(app, header):
    inv = request("INVITE", "sip:bob@ims.example", via=f"{UE}:5060")
    rec = arrives(reply_to(inv, 407, "Proxy Authentication Required",
                           (f"{header}: {challenge()}",)), inv, in_transaction=False)
    app.ksr_reply_route(None)
    assert rec.dropped


def test_other_stray_replies_go_on(app):
    """A 2xx to an INVITE retransmitted after its transaction ended must still reach the caller."""
    inv = request("INVITE", "sip:bob@ims.example", via=f"{UE}:5060")
    rec = arrives(reply_to(inv, 200, "OK"), inv, in_transaction=False)
    assert app.ksr_reply_route(None) == 1 and not rec.dropped


def test_replies_of_a_transaction_are_left_to_tm(app):
    """The 401 of a live transaction goes to ksr_register_reply (ipsec_create strips the keys)."""
    reg = register()
    rec = arrives(reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge()}",)),
                  reg, in_transaction=True)
    assert app.ksr_reply_route(None) == 1 and not rec.dropped


@pytest.mark.parametrize("code,header", [(200, "WWW-Authenticate"), (401, "Proxy-Authenticate"),
                                         (407, "Proxy-Authenticate"), (403, "WWW-Authenticate")])
def test_keys_in_any_other_challenge_of_a_transaction_are_removed(app, code, header):
    """Found by tests/fuzz_sip.py: a 200 OK to REGISTER carrying a WWW-Authenticate with
    ck/ik was forwarded as it came (only a 401's WWW-Authenticate went through ipsec_create)."""
    reg = register()
    rec = arrives(reply_to(reg, code, "Whatever", (f"{header}: {challenge()}",)), reg,
                  in_transaction=True)
    assert app.ksr_reply_route(None) == 1 and not rec.dropped
    assert rec.values(header) == [] and "with CK/IK removed" in rec.log_text()


def test_the_401_to_register_keeps_its_keys_for_ipsec_create(app):
    reg = register()
    rec = arrives(reply_to(reg, 401, "Unauthorized", (f"WWW-Authenticate: {challenge()}",)),
                  reg, in_transaction=True)
    app.ksr_reply_route(None)
    assert rec.values("WWW-Authenticate") == [challenge()]


def test_a_stray_reply_from_a_stranger_is_dropped_not_forwarded_along_its_via(app):
    """A sender on a phone's address writes a response to one of our protected ports, its
    second Via naming the phone's protected client port: forwarded along it, from our port,
    it went to the phone in cleartext (port_pc -> port_uc: no SA pairs them; seen in
    test_hostile.py's flood). A reply matching no transaction goes on only from the core or
    through a phone's SAs."""
    msg = request("MESSAGE", "sip:bob@ims.example", via=f"{UE}:41410")
    rec = KSR._load_reply(reply_to(msg, 200, "OK"), msg, source=(UE, 44817, "udp"),
                          in_transaction=False)
    assert app.ksr_reply_route(None) == 0 and rec.dropped
    assert "neither from the core nor through a phone's SAs" in rec.log_text()
