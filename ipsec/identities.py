"""Registrar decisions about identity (3GPP TS 24.229): which public identities a phone
registered through its SAs, which one a request from it asserts, and what the S-CSCF is told
of a REGISTER's protection.

Pure functions over header values (repeated headers joined by commas, as Kamailio hands them
out). The identities come from the S-CSCF's 200 OK to REGISTER (P-Associated-URI, 24.229
5.2.2.1); the P-CSCF keeps them with the contact and asserts one of them on every request that
comes through that contact's SAs (5.2.6.3): the phone may prefer one (P-Preferred-Identity),
never assert one itself.
"""
from __future__ import annotations

import re

from . import headers

# 24.229 5.2.2.1: the P-CSCF marks a REGISTER it relays as received through the SAs or not
PROTECTED = "yes"
UNPROTECTED = "no"


def uri_list(value: str | None) -> tuple[str, ...]:
    """The URIs of a P-Associated-URI / Service-Route / P-Preferred-Identity value, in order
    (display names and header parameters dropped). A value we cannot read gives ()."""
    try:
        return tuple(uri for uri, _ in headers.contacts(value) if uri and uri != "*")
    except headers.HeaderError:
        return ()


def _visual_separators(number: str) -> str:
    return re.sub(r"[-.()]", "", number)


def identity_key(uri: str) -> tuple[str, ...]:
    """What two spellings of one public identity share: scheme and user/number as written
    (case-sensitive, RFC 3261 19.1.4), host case-insensitive, parameters and port ignored
    except for tel URIs' visual separators (RFC 3966)."""
    text = uri.strip().strip("<>").strip()
    scheme, _, rest = text.partition(":")
    scheme = scheme.lower()
    if scheme == "tel":
        return (scheme, _visual_separators(rest.split(";", 1)[0]))
    rest = rest.split("?", 1)[0]
    user, at, hostpart = rest.rpartition("@")
    host = hostpart.split(";", 1)[0]
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    else:
        host = host.split(":", 1)[0]
    return (scheme, user.split(";", 1)[0], host.lower())


def asserted_identity(registered: tuple[str, ...], preferred: str | None) -> str | None:
    """The identity a request through a phone's SAs asserts (24.229 5.2.6.3): the first
    P-Preferred-Identity value that is one of `registered`, else the default identity (the
    first registered one). None when nothing is registered through those SAs."""
    if not registered:
        return None
    known = {identity_key(uri): uri for uri in reversed(registered)}
    for uri in uri_list(preferred):
        match = known.get(identity_key(uri))
        if match is not None:
            return match
    return registered[0]


_PARAM = re.compile(r'(?P<sep>,\s*)integrity-protected\s*=\s*(?:"[^"]*"|[^,\s]*)\s*', re.I)
_FIRST_PARAM = re.compile(r'(\s*\S+\s+)integrity-protected\s*=\s*(?:"[^"]*"|[^,\s]*)\s*,?\s*',
                          re.I)


def with_integrity_protected(authorization: str, value: str) -> str:
    """An Authorization value with `integrity-protected="value"` as the only one of its
    kind (whatever the phone wrote there is dropped)."""
    kept = _strip_param(authorization).rstrip().rstrip(",")
    return f'{kept}, integrity-protected="{value}"'


def _strip_param(authorization: str) -> str:
    """Remove every integrity-protected parameter outside quoted strings."""
    out, i, quoted = [], 0, False
    while i < len(authorization):
        ch = authorization[i]
        if ch == '"' and (i == 0 or authorization[i - 1] != "\\"):
            quoted = not quoted
        if not quoted and ch == ",":
            m = _PARAM.match(authorization, i)
            if m:
                i = m.end()
                continue
        out.append(ch)
        i += 1
    text = "".join(out)
    # the parameter first, right after the scheme ("Digest integrity-protected=..., ...")
    head = _FIRST_PARAM.match(text)
    if head:
        text = head.group(1) + text[head.end():]
    return text


def registered(associated: str | None, to_value: str | None) -> tuple[str, ...]:
    """The identities a 200 OK to REGISTER registers through the phone's SAs: its
    P-Associated-URI list; without one (a core that sends none), the AoR the REGISTER named."""
    found = uri_list(associated)
    if found:
        return found
    try:
        return (headers.aor(to_value),)
    except (headers.HeaderError, ValueError):
        return ()
