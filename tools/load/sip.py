"""Just enough SIP over bytes for the load generator's phones and S-CSCF stub.

Independent of the code under test. Messages stay bytes: the generator shares one CPU with
Kamailio, so every look-up is one precompiled regular expression over the datagram, never a
full parse. Header folding and multi-value lines are not handled: the only peer is Kamailio,
which writes neither.
"""
from __future__ import annotations

import re

_I = re.I
CSEQ = re.compile(rb"\r\nCSeq[ \t]*:[ \t]*(\d+)[ \t]+([A-Za-z]+)", _I)
CALL_ID = re.compile(rb"\r\n(?:Call-ID|i)[ \t]*:[ \t]*([^\r\n]+)", _I)
SECURITY_SERVER = re.compile(rb"\r\nSecurity-Server[ \t]*:[ \t]*([^\r\n]+)", _I)
NONCE = re.compile(rb'nonce="([^"]*)"')
RESPONSE = re.compile(rb'response="([^"]*)"')
TO_URI = re.compile(rb"\r\n(?:To|t)[ \t]*:[^<\r\n]*<([^>]+)>", _I)
CONTACT = re.compile(rb"\r\n(?:Contact|m)[ \t]*:[^<\r\n]*<([^>]+)>([^\r\n]*)", _I)
EXPIRES_PARAM = re.compile(rb";[ \t]*expires[ \t]*=[ \t]*(\d+)", _I)
EXPIRES = re.compile(rb"\r\nExpires[ \t]*:[ \t]*(\d+)", _I)
PATH = re.compile(rb"\r\nPath[ \t]*:[ \t]*([^\r\n]+)", _I)
TOP_VIA = re.compile(rb"\r\n(?:Via|v)[ \t]*:[ \t]*SIP/2\.0/UDP[ \t]+([^;:\s]+)(?::(\d+))?", _I)
# The keys of the S-CSCF's challenge: a phone must never see them (33.203).
KEYS = re.compile(rb"\b(?:ck|ik)[ \t]*=", _I)
# What a response copies from its request, in the request's order (RFC 3261 8.2.6.2).
_COPIED = re.compile(rb"\r\n((Via|v|From|f|To|t|Call-ID|i|CSeq)[ \t]*:[^\r\n]*)", _I)
_TO_NAMES = (b"to", b"t")


def status_of(data: bytes) -> int:
    """The status code of a response (the caller knows it is one)."""
    return int(data[8:11])


def status_line(data: bytes) -> str:
    """'403 Forbidden - ...' of a response, for failure causes."""
    end = data.find(b"\r\n")
    return data[8:end].decode(errors="replace")


def cseq(data: bytes) -> tuple[int, bytes]:
    """(number, METHOD) of the CSeq header; (-1, b"") when missing."""
    m = CSEQ.search(data)
    return (int(m.group(1)), m.group(2).upper()) if m else (-1, b"")


def first(pattern: re.Pattern[bytes], data: bytes) -> bytes | None:
    m = pattern.search(data)
    return m.group(1) if m else None


def top_via(data: bytes) -> tuple[str, int] | None:
    """Where a UDP response to this request goes: the top Via's sent-by."""
    m = TOP_VIA.search(data)
    if m is None:
        return None
    return m.group(1).decode(), int(m.group(2) or 5060)


def params(value: bytes) -> dict[str, str]:
    """`;name=value` parameters of the first element of a header value (a mechanism)."""
    out = {}
    for part in value.split(b",", 1)[0].split(b";")[1:]:
        name, _, v = part.partition(b"=")
        out[name.strip().lower().decode()] = v.strip().strip(b'"').decode()
    return out


def reply(request: bytes, status: bytes, to_tag: bytes, extra: bytes = b"") -> bytes:
    """A response to `request`: Via/From/To/Call-ID/CSeq copied, To tagged, `extra` header
    lines (each ending in CRLF) appended, no body."""
    out = [b"SIP/2.0 " + status]
    for line, name in _COPIED.findall(request):
        if name.lower() in _TO_NAMES and b";tag=" not in line.lower():
            line += b";tag=" + to_tag
        out.append(line)
    return b"\r\n".join(out) + b"\r\n" + extra + b"Content-Length: 0\r\n\r\n"
