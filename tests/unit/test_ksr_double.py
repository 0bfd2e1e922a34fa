"""The KSR double answers as Kamailio 5.6.3 does (types, lumps, sockets) and refuses the rest."""
from __future__ import annotations

import pytest

import KSR
from scenario import CORE, PCSCF, UE, register, reply_to

SOCKETS = (f"udp:{PCSCF}:5060", f"tcp:{PCSCF}:5060", f"udp:{PCSCF}:5100", f"udp:{PCSCF}:5200")


@pytest.fixture(autouse=True)
def fresh():
    KSR._reset()
    KSR._listen(*SOCKETS)


def invite(*extra: str) -> str:
    return "\r\n".join([
        f"INVITE sip:alice@{UE}:5060;transport=udp SIP/2.0",
        f"Via: SIP/2.0/UDP {CORE}:5060;branch=z9hG4bK-1",
        "Via: SIP/2.0/UDP 10.0.0.50:5060;branch=z9hG4bK-0",
        "From: <sip:bob@ims.example>;tag=1",
        "To: <sip:alice@ims.example>",
        "Call-ID: c1",
        "CSeq: 7 INVITE",
        "Subject: folded",
        "  second line",
        *extra,
        "Content-Length: 0", "", ""])


def test_request_pseudo_variables_have_kamailios_types():
    KSR._load_request(invite(), source=(CORE, 5060, "UDP"), local=(PCSCF, 5060))
    get = KSR.pv.get
    assert (get("$rm"), get("$rs"), get("$si"), get("$sp"), get("$pr"), get("$Ri"), get("$Rp")) \
        == ("INVITE", None, CORE, 5060, "udp", PCSCF, 5060)
    assert get("$ru") == get("$ou") == f"sip:alice@{UE}:5060;transport=udp"
    assert get("$rU") == "alice"
    assert get("$du") is None
    assert get("$T_req($si)") is None  # no transaction yet


def test_headers_first_all_indexed_and_absent():
    KSR._load_request(invite())
    get = KSR.pv.get
    assert get("$hdr(via)") == f"SIP/2.0/UDP {CORE}:5060;branch=z9hG4bK-1"
    assert get("$(hdr(Via)[*])") == (f"SIP/2.0/UDP {CORE}:5060;branch=z9hG4bK-1,"
                                      "SIP/2.0/UDP 10.0.0.50:5060;branch=z9hG4bK-0")
    assert get("$(hdr(Via)[1])").startswith("SIP/2.0/UDP 10.0.0.50")
    assert get("$(hdr(Via)[-1])") == get("$(hdr(Via)[1])")
    assert get("$(hdr(Via)[2])") is None
    assert get("$hdr(Security-Client)") is None and get("$(hdr(Security-Client)[*])") is None
    assert get("$hdr(Subject)") == "folded\r\n  second line"
    assert KSR.hdr.is_present("CALL-ID") == 1 and KSR.hdr.is_present("Route") == -1


def test_compact_header_names_match_their_long_form():
    KSR._load_request(invite().replace("Call-ID: c1", "i: c1"))
    assert KSR.pv.get("$hdr(Call-ID)") == "c1"


def test_changes_are_lumps_reads_still_see_the_received_message():
    KSR._load_request(invite())
    assert KSR.hdr.remove("Subject") == 1
    assert KSR.hdr.append("X-New: 1\r\n") == 1
    assert KSR.pv.get("$hdr(Subject)") is not None and KSR.pv.get("$hdr(X-New)") is None
    assert KSR.hdr.is_present("X-New") == -1
    assert KSR._rec.values("Subject") == [] and KSR._rec.values("X-New") == ["1"]
    assert KSR._rec.headers()[-1] == ("X-New", "1")


def test_append_needs_one_crlf_terminated_header():
    KSR._load_request(invite())
    with pytest.raises(ValueError):
        KSR.hdr.append("X-New: 1")


def test_reply_reads_its_own_status_and_the_transactions_request():
    reg = register()
    KSR._load_reply(reply_to(reg, 401, "Unauthorized"), reg, request_source=(UE, 5060, "udp"))
    get = KSR.pv.get
    assert get("$rs") == 401 and isinstance(get("$rs"), int)
    assert get("$rm") == "REGISTER" and get("$ru") is None and get("$ou") is None
    assert (get("$si"), get("$sp")) == (CORE, 5060)
    assert (get("$T_req($si)"), get("$T_req($sp)"), get("$T_req($rs)")) == (UE, 5060, None)
    assert get("$T_req($(hdr(Security-Client)[*]))").startswith("ipsec-3gpp;")


def test_send_and_recv_socket_and_source_address():
    KSR._load_request(invite(), source=(UE, 31000, "udp"), local=(PCSCF, 5200))
    assert KSR.corex.set_send_socket(f"udp:{PCSCF}:5100") == 1
    assert KSR._rec.send_socket == f"udp:{PCSCF}:5100"
    assert KSR.corex.set_recv_socket(f"udp:{PCSCF}:5100") == 1
    assert KSR.corex.set_source_address(f"udp:{UE}:31001") == 1
    assert (KSR.pv.get("$Ri"), KSR.pv.get("$Rp"), KSR.pv.get("$si"), KSR.pv.get("$sp")) == (
        PCSCF, 5100, UE, 31001)


def test_unknown_socket_returns_1_changes_nothing_and_warns():
    """corex's ki_set_socket_helper: LM_WARN "no socket found to match", return 1."""
    KSR._load_request(invite())
    assert KSR.corex.set_send_socket(f"udp:{PCSCF}:5999") == 1
    assert KSR.corex.set_recv_socket(f"tcp:{PCSCF}:5999") == 1
    assert KSR._rec.send_socket is None and KSR._rec.reply_socket is None
    assert KSR.pv.get("$Rp") == 5060
    assert len(KSR._rec.logs["warn"]) == 2


def test_relay_records_the_state_and_the_transaction_keeps_the_request():
    KSR._load_request(invite(), source=(UE, 31000, "udp"), local=(PCSCF, 5200))
    KSR.setdsturi(f"sip:{CORE}:5060")
    KSR.corex.set_recv_socket(f"udp:{PCSCF}:5100")
    KSR.corex.set_source_address(f"udp:{UE}:31001")
    KSR.rr.record_route_preset("sip:a;lr", "sip:b;lr")
    KSR.tm.t_on_reply("ksr_x")
    KSR.hdr.remove("Subject")
    assert KSR.tm.t_check_trans() == -1
    assert KSR.tm.t_relay() == 1
    relay = KSR._rec.relays[0]
    assert (relay.dst_uri, relay.reply_socket, relay.reply_target, relay.on_reply) == (
        f"sip:{CORE}:5060", f"udp:{PCSCF}:5100", f"udp:{UE}:31001", "ksr_x")
    assert relay.record_route == (("sip:a;lr", "sip:b;lr"),)
    assert "Subject" not in dict(relay.headers)
    KSR._load_reply(reply_to(invite(), 180, "Ringing"), relay)
    assert (KSR.pv.get("$T_req($sp)"), KSR.pv.get("$T_req($Rp)")) == (31001, 5100)
    assert KSR.pv.get("$T_req($hdr(Subject))") is not None  # the clone has the parsed headers
    assert KSR.pv.get("$T_req($du)") == f"sip:{CORE}:5060"


def test_newtran_fixes_the_request_copy_and_the_reply_path():
    KSR._load_request(invite(), source=(UE, 31000, "udp"), local=(PCSCF, 5200))
    KSR.corex.set_recv_socket(f"udp:{PCSCF}:5100")
    assert KSR.tm.t_newtran() == 1
    assert KSR.tm.t_newtran() == -10  # E_SCRIPT: this request has its transaction already
    KSR.corex.set_source_address(f"udp:{UE}:31001")  # too late for the transaction
    assert KSR.tm.t_relay() == 1
    relay = KSR._rec.relays[0]
    assert (relay.reply_socket, relay.reply_target) == (f"udp:{PCSCF}:5100", None)
    KSR._load_reply(reply_to(invite(), 180, "Ringing"), relay)
    assert (KSR.pv.get("$T_req($sp)"), KSR.pv.get("$T_req($Rp)")) == (31000, 5100)


def test_newtran_absorbs_a_retransmission_and_send_reply_follows_the_transaction():
    KSR._load_request(invite(), retransmission=True)
    assert KSR.tm.t_newtran() == 0
    KSR._load_request(invite())
    KSR.sl.send_reply(404, "Not Here")
    assert KSR.tm.t_newtran() == 1
    KSR.sl.send_reply(403, "Forbidden")
    assert [(r.code, r.stateful) for r in KSR._rec.replies] == [(404, False), (403, True)]


def test_avps_of_the_request_route_are_the_transactions():
    KSR._load_request(invite())
    KSR.pv.seti("$avp(n)", 42)
    KSR.tm.t_relay()
    KSR._load_reply(reply_to(invite(), 200, "OK"), KSR._rec.relays[0])
    assert KSR.pv.get("$avp(n)") == 42 and KSR.pv.get("$avp(other)") is None


def test_sl_replies_carry_append_to_reply_headers():
    KSR._load_request(invite())
    KSR.hdr.append_to_reply("Require: sec-agree\r\n")
    KSR.sl.sl_send_reply(421, "Extension Required")
    KSR.sl.sl_reply_error()
    assert [(r.code, r.reason, r.headers) for r in KSR._rec.replies][0] == (
        421, "Extension Required", (("Require", "sec-agree"),))
    assert KSR._rec.replies[1].code == 500


def test_change_reply_status_only_on_replies():
    KSR._load_request(invite())
    with pytest.raises(RuntimeError):
        KSR.textopsx.change_reply_status(503, "Service Unavailable")
    KSR._load_reply(reply_to(invite(), 401, "Unauthorized"), invite())
    assert KSR.textopsx.change_reply_status(503, "Service Unavailable") == 1
    assert KSR._rec.reply_status == (503, "Service Unavailable")


def test_maxfwd_decrements_adds_and_stops_at_zero():
    KSR._load_request(invite())
    assert KSR.maxfwd.process_maxfwd(10) == 2 and KSR._rec.values("Max-Forwards") == ["10"]
    KSR._load_request(invite("Max-Forwards: 70"))
    assert KSR.maxfwd.process_maxfwd(10) == 1 and KSR._rec.values("Max-Forwards") == ["69"]
    KSR._load_request(invite("Max-Forwards: 255"))
    assert KSR.maxfwd.process_maxfwd(10) == 1 and KSR._rec.values("Max-Forwards") == ["70"]
    KSR._load_request(invite("Max-Forwards: 0"))
    assert KSR.maxfwd.process_maxfwd(10) == -1


def test_totag_myself_loose_route_and_path():
    KSR._load_request(invite(f"Route: <sip:{PCSCF}:5060;lr>, <sip:{CORE}:5070;lr>")
                      .replace("To: <sip:alice@ims.example>", "To: <sip:alice@ims.example>;tag=9"))
    assert KSR.siputils.has_totag() == 1
    assert KSR.is_myself_ruri() == -1
    assert KSR.rr.loose_route() == 1
    assert KSR.pv.get("$du") == f"sip:{CORE}:5070;lr"
    assert KSR._rec.values("Route") == [f"<sip:{CORE}:5070;lr>"]
    KSR._load_request(invite(f"Route: <sip:{PCSCF}:5200;r2=on;lr>",
                             f"Route: <sip:{PCSCF}:5060;r2=on;lr>,<sip:{CORE}:5070;lr>"))
    assert KSR.rr.loose_route() == 1
    assert KSR._rec.values("Route") == [f"<sip:{CORE}:5070;lr>"]
    KSR._load_request(register())
    assert KSR.siputils.has_totag() == -1 and KSR.rr.loose_route() == -1
    KSR._load_request(invite().replace(f"sip:alice@{UE}:5060;transport=udp", f"sip:{PCSCF}"))
    assert KSR.is_myself_ruri() == 1
    KSR.path.add_path()
    assert KSR._rec.values("Path") == [f"<sip:{PCSCF}:5060;lr>"]


def test_defines_and_logs():
    KSR._defines({"NEXT_HOP": '"sip:x"'})
    assert KSR.kx.get_def("NEXT_HOP") == '"sip:x"' and KSR.kx.get_def("NOPE") == ""
    KSR._load_request(invite())
    KSR.info("i\n"), KSR.warn("w\n"), KSR.err("e\n"), KSR.dbg("d\n")
    assert {level: lines for level, lines in KSR._rec.logs.items()} == {
        "info": ["i\n"], "warn": ["w\n"], "err": ["e\n"], "dbg": ["d\n"]}


@pytest.mark.parametrize("call", [
    lambda: KSR.pv.sets("$du", "sip:x"),
    lambda: KSR.pv.seti("$var(x)", 1),
    lambda: KSR.x.modf("pcscf_save"),
    lambda: KSR.notice("n"),
    lambda: KSR.pv.get("$fu"),
])
def test_what_the_double_does_not_implement_fails_loudly(call):
    KSR._load_request(invite())
    with pytest.raises(AttributeError):
        call()
