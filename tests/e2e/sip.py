"""Just enough SIP for the test phone and the S-CSCF stub: build, parse, frame on TCP.

Written for the tests, independent of the code under test.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field


def token() -> str:
    return secrets.token_hex(6)


@dataclass
class Msg:
    first: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""

    @property
    def is_request(self) -> bool:
        return not self.first.startswith("SIP/2.0")

    @property
    def method(self) -> str:
        return self.first.split()[0] if self.is_request else self.get("CSeq").split()[1]

    @property
    def status(self) -> int:
        return int(self.first.split()[1])

    @property
    def ruri(self) -> str:
        return self.first.split()[1]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def add(self, name: str, value: str) -> "Msg":
        self.headers.append((name, value))
        return self

    def set(self, name: str, value: str) -> "Msg":
        self.headers = [(n, v) for n, v in self.headers if n.lower() != name.lower()]
        return self.add(name, value)

    def encode(self) -> bytes:
        heads = [(n, v) for n, v in self.headers if n.lower() != "content-length"]
        lines = [self.first] + [f"{n}: {v}" for n, v in heads]
        lines.append(f"Content-Length: {len(self.body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + self.body).encode()

    def text(self) -> str:
        return self.encode().decode()


def parse(data: bytes) -> Msg:
    text = data.decode()
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    msg = Msg(lines[0], body=body)
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and msg.headers:
            n, v = msg.headers[-1]
            msg.headers[-1] = (n, v + " " + line.strip())
            continue
        name, _, value = line.partition(":")
        msg.headers.append((name.strip(), value.strip()))
    return msg


def read_stream(buf: bytearray) -> bytes | None:
    """One whole message off the front of a TCP byte stream, or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    m = re.search(rb"\r\ncontent-length\s*:\s*(\d+)", bytes(buf[:end + 2]), re.I)
    total = end + 4 + (int(m.group(1)) if m else 0)
    if len(buf) < total:
        return None
    data = bytes(buf[:total])
    del buf[:total]
    return data


def reply(req: Msg, status: int, reason: str, *, to_tag: str | None = None) -> Msg:
    """A response copying Via, From, To (tagged), Call-ID, CSeq and Record-Route."""
    r = Msg(f"SIP/2.0 {status} {reason}")
    for name in ("Via", "Record-Route"):
        for v in req.all(name):
            r.add(name, v)
    r.add("From", req.get("From"))
    to = req.get("To")
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    r.add("To", to)
    r.add("Call-ID", req.get("Call-ID"))
    r.add("CSeq", req.get("CSeq"))
    return r


def params(value: str) -> dict[str, str]:
    """`;name=value` parameters of a header value (after the first element)."""
    out = {}
    for part in value.split(";")[1:]:
        n, _, v = part.partition("=")
        out[n.strip().lower()] = v.strip().strip('"')
    return out


def uri_of(value: str) -> str:
    m = re.search(r"<([^>]+)>", value)
    return m.group(1) if m else value.split(";")[0].strip()


def via_sent_by(value: str) -> tuple[str, int]:
    m = re.match(r"SIP/2\.0/\w+\s+(\[[^\]]+\]|[^:;\s]+)(?::(\d+))?", value.strip())
    assert m, value
    return m.group(1).strip("[]"), int(m.group(2) or 5060)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def stranger_register(user: str, host: str, port: int, security_client: str) -> bytes:
    """A first, unprotected REGISTER with sec-agree from `host`:`port`, as any sender can
    make one (the flood and overload tests' strangers): new Call-ID, branch and tag."""
    aor = f"sip:{user}@ims.test"
    m = Msg("REGISTER sip:ims.test SIP/2.0")
    for name, value in (
            ("Via", f"SIP/2.0/UDP {hostport(host, port)};branch=z9hG4bK{token()};rport"),
            ("Max-Forwards", "70"), ("From", f"<{aor}>;tag={token()}"), ("To", f"<{aor}>"),
            ("Call-ID", token()), ("CSeq", "1 REGISTER"),
            ("Contact", f"<sip:{user}@{hostport(host, port)}>;expires=600"),
            ("Supported", "path, sec-agree"), ("Require", "sec-agree"),
            ("Proxy-Require", "sec-agree"), ("Security-Client", security_client)):
        m.add(name, value)
    return m.encode()
