"""Parsers and log lines against what a hostile phone writes (issue 10, finding 7).

Each case failed before: an exception no caller expects (IndexError, a bare ValueError
reported as an internal error), a port read from non-ASCII digits, a tel: R-URI from the core
answered as an internal error, an AoR with control characters written raw into the log.
"""
from __future__ import annotations

import pytest

import KSR
from ipsec import headers
from ipsec.logtext import clean
from ipsec.sipuri import SipUriError, alias_target, parse_uri
from scenario import CORE, UE, challenge, register, reply_to, request

ARABIC_5060 = "\u0665\u0660\u0666\u0660"  # Arabic-Indic digits int() reads as 5060


@pytest.mark.parametrize("value", ["", " ", " , ", ",", "\t"])
def test_a_blank_via_is_a_header_error(value):
    with pytest.raises(headers.HeaderError):
        headers.top_via(value)


@pytest.mark.parametrize("port", [ARABIC_5060, "\u00b2", "5\u00b9", "\uff15\uff10\uff16\uff10"])
def test_ports_are_ascii_digits_only(port):
    with pytest.raises(SipUriError):
        parse_uri(f"sip:alice@{UE}:{port}")
    with pytest.raises(headers.HeaderError):
        headers.top_via(f"SIP/2.0/UDP {UE}:{port};branch=z9hG4bK1")
    with pytest.raises(SipUriError):
        alias_target(parse_uri(f"sip:a@{UE};alias={UE}~{port}~1"))
    with pytest.raises(SipUriError):
        alias_target(parse_uri(f"sip:a@{UE};alias={UE}~5060~{port[:1]}"))


@pytest.mark.parametrize("value", [ARABIC_5060, "\u00b2"])
def test_expires_are_ascii_digits_only(value):
    with pytest.raises(headers.HeaderError):
        headers.expires_of({"expires": value}, None, 3600)
    with pytest.raises(headers.HeaderError):
        headers.expires_of({}, value, 3600)


def test_an_aor_with_control_characters_is_refused_and_folding_is_not():
    for bad in ("<sip:al\x1b[2Jice@ims.example>", "<sip:alice@ims.example>\rINFO: x",
                "<sip:alice\x00@ims.example>", "<sip:a\x7f@ims.example>"):
        with pytest.raises(headers.HeaderError):
            headers.aor(bad)
    assert headers.aor("<sip:alice@ims.example>\r\n ;tag=1") == "sip:alice@ims.example"


def test_clean_makes_one_printable_line():
    dirty = "sip:a@b\r\nERROR: forged\x1b[31m\u202eevil\u2028x"
    out = clean(dirty)
    assert out.isprintable() and "\r" not in out and "\n" not in out and "\x1b" not in out
    assert "forged" in out and clean("plain text") == "plain text"
    assert len(clean("x" * 100_000)) < 2100


def test_a_tel_uri_from_the_core_is_an_unknown_phone_not_an_internal_error(pcscf):
    pcscf.registered()
    raw = request("INVITE", "tel:+4912345", via=f"{CORE}:5060")
    rec = pcscf.request(raw, source=(CORE, 5060, "udp"))
    assert [r.code for r in rec.replies] == [480] and rec.relays == []
    assert "internal error" not in rec.log_text() and "tel:+4912345" in rec.log_text()


def _log_lines(rec) -> list[str]:
    return [line for lines in rec.logs.values() for line in lines]


def test_no_log_line_carries_what_the_phone_wrote_raw(pcscf):
    """An AoR with ESC and CR: before, it was stored and logged raw ('expired, removed')."""
    aor = "sip:al\x1b[2J\rice@ims.example"
    reg = register(aor=aor)
    rec = pcscf.request(reg)
    lines = _log_lines(rec)
    rec = pcscf.register_reply(rec.relays[0], reply_to(reg, 401, "Unauthorized", (
        f"WWW-Authenticate: {challenge()}",)))
    lines += _log_lines(rec)
    assert rec.reply_status is not None and not rec.values("WWW-Authenticate")  # refused
    assert "control character in To" in rec.log_text()
    pcscf.clock.advance(4000)
    pcscf.routing.sweep()
    lines += _log_lines(KSR._rec)
    for line in lines:
        assert line.endswith("\n") and line[:-1].isprintable(), repr(line)
