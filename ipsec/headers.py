"""The few SIP header facts the module functions read: AoR, contact, expiry, top Via, tags.

Pure functions over header values as Kamailio hands them out (repeated headers joined by
commas). Bad input raises `HeaderError`, the sender's fault.
"""
from __future__ import annotations

import re

from .sipuri import Address, SipUriError, is_digits, normalize_host, parse_uri


class HeaderError(ValueError):
    """A header the module needs is missing or unreadable."""


def _split_commas(value: str) -> list[str]:
    """Split at commas outside <...> and quotes (a display name or URI may contain commas)."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(value):
        if ch == '"' and (i == 0 or value[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            parts.append(value[start:i].strip())
            start = i + 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def _uri_and_params(value: str) -> tuple[str, dict[str, str]]:
    """name-addr or addr-spec, then header parameters (after '>' or, bare, after the URI)."""
    if "<" in value:
        start, end = value.index("<"), value.find(">")
        if end < start:
            raise HeaderError(f"unclosed '<' in {value!r}")
        uri, rest = value[start + 1 : end], value[end + 1 :]
    else:
        uri, _, rest = value.partition(";")
        rest = ";" + rest if rest else ""
    return uri.strip(), _params(rest)


def _params(rest: str) -> dict[str, str]:
    """`;name=value` parameters (names lower-cased, quotes taken off the values)."""
    params = {}
    for item in rest.split(";")[1:]:
        name, _, val = item.partition("=")
        params[name.strip().lower()] = val.strip().strip('"')
    return params


def aor(to_value: str | None) -> str:
    """The AoR of a REGISTER: its To URI without parameters (sip:user@domain)."""
    if not to_value:
        raise HeaderError("no To header")
    to_value = _FOLD.sub(" ", to_value)
    if _CONTROL.search(to_value):
        raise HeaderError("control character in To")
    uri, _ = _uri_and_params(to_value)
    try:
        parsed = parse_uri(uri)
    except SipUriError as e:
        raise HeaderError(f"To: {e}") from None
    user = f"{parsed.user}@" if parsed.user else ""
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{parsed.scheme}:{user}{host}"


def contacts(value: str | None) -> list[tuple[str, dict[str, str]]]:
    """Every Contact as (uri, params); [] for none. '*' is returned as ("*", {})."""
    if not value:
        return []
    return [("*", {}) if part == "*" else _uri_and_params(part) for part in _split_commas(value)]


def expires_of(contact_params: dict[str, str], expires_header: str | None, default: int) -> int:
    """A contact's expiry in seconds: its own `expires` parameter, else the Expires header."""
    for raw in (contact_params.get("expires"), expires_header):
        if raw is not None and raw.strip() != "":
            if not is_digits(raw.strip()):
                raise HeaderError(f"bad expires value {raw!r}")
            return int(raw.strip())
    return default


_VIA = re.compile(r"\s*SIP\s*/\s*2\.0\s*/\s*(?P<proto>[A-Za-z]+)\s+(?P<host>\[[^\]]+\]|[^\s;:]+)"
                  r"(?:\s*:\s*(?P<port>[0-9]+))?\s*(?=;|$)", re.I)
_FOLD = re.compile(r"\r?\n[ \t]+")  # header folding (RFC 3261 7.3.1) is white space
# C0 controls but tab, and DEL (a raw CR/LF/ESC in a To would reach the store and every log line)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _sent_by(entry: str, what: str) -> tuple[Address, dict[str, str]]:
    """One Via entry: its sent-by (the transport's default port when it names none) and its
    parameters."""
    m = _VIA.match(entry)
    if not m:
        raise HeaderError(f"unreadable {what}")
    proto = m.group("proto").lower()
    port = int(m.group("port")) if m.group("port") else (5061 if proto == "tls" else 5060)
    try:
        return Address(normalize_host(m.group("host")), port, proto), _params(entry[m.end():])
    except SipUriError as e:
        raise HeaderError(f"{what}: {e}") from None


def top_via(value: str | None) -> Address:
    """The sent-by of the first Via: where the phone says it wants its replies."""
    if not value:
        raise HeaderError("no Via header")
    first = _split_commas(value)
    if not first:
        raise HeaderError("unreadable Via")
    return _sent_by(first[0], "Via")[0]


def reply_next_hop(value: str | None) -> Address:
    """Where Kamailio forwards a reply that matches no transaction (forward_reply): to its
    second Via (the first is ours), at its `received` address if it has one, at its
    `rport` value if it has one, else at its sent-by (RFC 3261 18.2.2, RFC 3581)."""
    entries = _split_commas(_FOLD.sub(" ", value)) if value else []
    if len(entries) < 2:
        raise HeaderError("no second Via")
    sent_by, params = _sent_by(entries[1], "second Via")
    port_text = params.get("rport") or str(sent_by.port)
    if not is_digits(port_text) or not 0 < int(port_text) < 65536:
        raise HeaderError(f"second Via: bad port {port_text!r}")
    try:
        host = normalize_host(params["received"]) if params.get("received") else sent_by.host
    except SipUriError as e:
        raise HeaderError(f"second Via: {e}") from None
    return Address(host, int(port_text), sent_by.proto)


def option_tags(value: str | None) -> list[str]:
    """The option tags of a Require/Proxy-Require/Supported value, as written but for white
    space (a folded value's CRLF never goes back into a header we write)."""
    return [" ".join(t.split()) for t in (value or "").split(",") if t.strip()]
