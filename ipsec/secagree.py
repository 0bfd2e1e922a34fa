"""Sec-agree (RFC 3329, 3GPP TS 33.203 Annex H): read the phone's offer, choose, answer, verify.

Pure functions over header values (the text after ``Name:``), no I/O. The layout follows h11:
the grammar first, as named pieces straight from the ABNF; then reading; then writing. Anything
wrong with what the network sent raises `SecAgreeError`, so the caller can answer the phone with
a SIP error; a wrong argument from our own code raises a plain `ValueError`.

Decisions:
- Structure (tokens, separators, quoted strings) is checked for every mechanism, since a
  broken list cannot be split reliably. Values are checked only for ``ipsec-3gpp``: other
  mechanisms (``digest``, ``tls``, ...) are ignored.
- Header values may carry surrounding whitespace or a trailing CRLF (as a script may hand them
  over); an empty value or an empty list element is an error, as in the ABNF.
- Offer choice without preference takes the last usable offer, as the C module does. With
  ``ipsec_preferred_alg`` and/or ``ipsec_preferred_ealg``, the first usable offer satisfying
  every preference that is set; when no offer satisfies them, we fall back to the
  no-preference rule rather than refuse the phone: a preference is an operator's taste, not
  a policy, and the offers we can serve are all acceptable.
- An offer with SPI 0 (reserved by RFC 4303, never sent on the wire) or port 0 cannot be
  served and is skipped like one with a missing SPI or port.
- A malformed Security-Verify does not match (False): the caller answers it as a mismatch.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from decimal import Decimal

from ipsec.algorithms import AUTH_ALGS, ENC_ALGS, is_valid_pair

# --- Grammar: RFC 3261 section 25.1, RFC 3329 section 2.2, TS 33.203 Annex H -----------------

# SWS = [LWS]; LWS = [*WSP CRLF] 1*WSP  (written so that no text matches two ways)
SWS = r"[ \t]*(?:\r\n[ \t]+)?"
SEMI = rf"{SWS};{SWS}"
EQUAL = rf"{SWS}={SWS}"
COMMA = rf"{SWS},{SWS}"
TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
# quoted-string = SWS DQUOTE *(qdtext / quoted-pair) DQUOTE
# qdtext = LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII; quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F)
QDTEXT = r"[ \t]|\r\n[ \t]|[\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]"
QUOTED_PAIR = r"\\[\x00-\x09\x0b\x0c\x0e-\x7f]"
QUOTED_STRING = rf'"(?:{QDTEXT}|{QUOTED_PAIR})*"'
IPV6_REFERENCE = r"\[[0-9A-Fa-f:.]+\]"
# generic-param = token [ EQUAL gen-value ]; gen-value = token / host / quoted-string
GEN_VALUE = rf"{TOKEN}|{IPV6_REFERENCE}|{QUOTED_STRING}"
# qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
QVALUE = r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?"
# 33.203 Annex H: spivalue = 10DIGIT (0 to 4294967295); port = 1*DIGIT (0 to 65535)
SPIVALUE = r"[0-9]{1,10}"
PORT = r"[0-9]{1,5}"
# RFC 3261 auth-param = auth-param-name EQUAL ( token / quoted-string )
AUTH_PARAM_VALUE = rf"{TOKEN}|{QUOTED_STRING}"
LHEX32 = r"[0-9A-Fa-f]{32}"

IPSEC_3GPP = "ipsec-3gpp"
WORD_PARAMS = ("alg", "ealg", "prot", "mod")
MAX_SPI = 2**32 - 1
MAX_PORT = 65535

_sws = re.compile(SWS)
_semi = re.compile(SEMI)
_equal = re.compile(EQUAL)
_comma = re.compile(COMMA)
_token = re.compile(TOKEN)
_gen_value = re.compile(GEN_VALUE)
_auth_value = re.compile(AUTH_PARAM_VALUE)
_qvalue = re.compile(QVALUE)
_spivalue = re.compile(SPIVALUE)
_port = re.compile(PORT)
_lhex32 = re.compile(LHEX32)
_quoted_pair = re.compile(QUOTED_PAIR)
_lws_run = re.compile(r"[ \t]+")
# The numeric ipsec-3gpp parameters: their digits and their largest value.
_NUMBERS = {
    "spi-c": (_spivalue, MAX_SPI),
    "spi-s": (_spivalue, MAX_SPI),
    "port-c": (_port, MAX_PORT),
    "port-s": (_port, MAX_PORT),
}


class SecAgreeError(ValueError):
    """The network sent a sec-agree or WWW-Authenticate value we cannot accept (their fault)."""


@dataclass(frozen=True)
class Offer:
    """One ipsec-3gpp sec-mechanism, with the defaults of TS 33.203 filled in."""

    alg: str
    ealg: str = "null"
    prot: str = "esp"
    mod: str = "trans"
    spi_c: int | None = None
    spi_s: int | None = None
    port_c: int | None = None
    port_s: int | None = None
    q: str | None = None


@dataclass(frozen=True)
class _Mechanism:
    """A sec-mechanism as written: lower-cased name, (lower-cased name, raw value) params."""

    name: str
    params: tuple[tuple[str, str | None], ...]


# --- Reading ----------------------------------------------------------------------------------


def _excerpt(text: str, pos: int) -> str:
    return repr(text[pos : pos + 20])


def _unquote(value: str) -> str:
    if value.startswith('"'):
        return _quoted_pair.sub(lambda m: m.group()[1], value[1:-1])
    return value


def _read_params(text: str, pos: int) -> tuple[list[tuple[str, str | None]], int]:
    """*(SEMI mech-parameters), starting at `pos`; returns the params and the new position."""
    params: list[tuple[str, str | None]] = []
    while semi := _semi.match(text, pos):
        name = _token.match(text, semi.end())
        if not name:
            raise SecAgreeError(f"expected a parameter name at {_excerpt(text, semi.end())}")
        pos, value = name.end(), None
        if equal := _equal.match(text, pos):
            gen_value = _gen_value.match(text, equal.end())
            if not gen_value:
                raise SecAgreeError(
                    f"bad value for parameter {name.group()!r} at {_excerpt(text, equal.end())}"
                )
            pos, value = gen_value.end(), gen_value.group()
        params.append((name.group().lower(), value))
    return params, pos


def _read_value(text: str) -> list[_Mechanism]:
    """One header value: sec-mechanism *(COMMA sec-mechanism)."""
    text = text.strip(" \t\r\n")
    mechanisms, pos = [], 0
    while True:
        name = _token.match(text, pos)
        if not name:
            raise SecAgreeError(f"expected a mechanism-name at {_excerpt(text, pos)}")
        params, pos = _read_params(text, name.end())
        mechanisms.append(_Mechanism(name.group().lower(), tuple(params)))
        if pos == len(text):
            return mechanisms
        comma = _comma.match(text, pos)
        if not comma:
            raise SecAgreeError(f"expected ';' or ',' at {_excerpt(text, pos)}")
        pos = comma.end()


def _read_mechanisms(values: str | list[str]) -> list[_Mechanism]:
    if isinstance(values, str):
        values = [values]
    return [m for value in values for m in _read_value(value)]


def _number(name: str, raw: str) -> int:
    pattern, maximum = _NUMBERS[name]
    value = _unquote(raw)
    if not pattern.fullmatch(value) or int(value) > maximum:
        raise SecAgreeError(f"{name} must be a number 0..{maximum}, got {value[:20]!r}")
    return int(value)


def _offer(mechanism: _Mechanism) -> Offer:
    """The ipsec-3gpp parameters of one mechanism, range-checked; others ignored."""
    fields: dict[str, object] = {}
    for name, raw in mechanism.params:
        if name not in (*WORD_PARAMS, *_NUMBERS, "q"):
            continue
        if raw is None:
            raise SecAgreeError(f"parameter {name} has no value")
        key = name.replace("-", "_")
        if key in fields:
            raise SecAgreeError(f"parameter {name} given twice in one mechanism")
        if name in _NUMBERS:
            fields[key] = _number(name, raw)
        elif name == "q":
            q = _unquote(raw)
            if not _qvalue.fullmatch(q):
                raise SecAgreeError(f"q must be a qvalue 0..1, got {q[:20]!r}")
            fields[key] = q
        else:
            fields[key] = _unquote(raw).lower()
    fields.setdefault("alg", "")
    return Offer(**fields)  # type: ignore[arg-type]


def parse_security_header(values: str | list[str]) -> list[Offer]:
    """The ipsec-3gpp offers of Security-Client/-Server/-Verify values, in order.

    Takes every value of every header of that name: the C module read only the first header,
    so a phone that put ``digest`` first got no IPsec at all.
    """
    return [_offer(m) for m in _read_mechanisms(values) if m.name == IPSEC_3GPP]


def _unservable(offer: Offer) -> str | None:
    """Why this P-CSCF cannot install the offer, or None if it can."""
    if offer.alg not in AUTH_ALGS:
        return f"unknown alg {offer.alg[:20]!r}"
    if offer.ealg not in ENC_ALGS:
        return f"unknown ealg {offer.ealg[:20]!r}"
    if not is_valid_pair(offer.alg, offer.ealg):
        return f"unsupported pair alg={offer.alg} ealg={offer.ealg}"
    if offer.prot != "esp":
        return f"prot {offer.prot[:20]!r} is not esp"
    if offer.mod != "trans":
        return f"mod {offer.mod[:20]!r} is not trans"
    for name in _NUMBERS:
        if not getattr(offer, name.replace("-", "_")):
            return f"{name} missing or 0"
    return None


def _satisfies(offer: Offer, preferred_alg: str, preferred_ealg: str) -> bool:
    return (not preferred_alg or offer.alg == preferred_alg.lower()) and (
        not preferred_ealg or offer.ealg == preferred_ealg.lower()
    )


def choose_offer(offers: list[Offer], preferred_alg: str = "", preferred_ealg: str = "") -> Offer:
    """The offer to answer, by the rules of the module docstring; none usable = SecAgreeError."""
    usable = [offer for offer in offers if _unservable(offer) is None]
    if not usable:
        reasons = "; ".join(f"#{i} {_unservable(o)}" for i, o in enumerate(offers, 1))
        raise SecAgreeError(f"no usable ipsec-3gpp offer ({reasons or 'none offered'})")
    if preferred_alg or preferred_ealg:
        for offer in usable:
            if _satisfies(offer, preferred_alg, preferred_ealg):
                return offer
    return usable[-1]


def _canonical_value(mechanism: str, name: str, raw: str | None) -> object:
    """A parameter value as compared by `verify_matches`: numbers as numbers, words any case."""
    if raw is None:
        return None
    value = _unquote(raw)
    if mechanism == IPSEC_3GPP and name in _NUMBERS:
        return _number(name, raw)
    if name == "q" and _qvalue.fullmatch(value):
        return Decimal(value).normalize()
    return _lws_run.sub(" ", value).lower()


def _canonical(values: str | list[str]) -> frozenset[tuple[str, frozenset[tuple[str, object]]]]:
    if isinstance(values, str):
        return _canonical_text(values)
    return frozenset(
        (m.name, frozenset((n, _canonical_value(m.name, n, v)) for n, v in m.params))
        for m in _read_mechanisms(values)
    )


@functools.lru_cache(maxsize=256)
def _canonical_text(value: str) -> frozenset[tuple[str, frozenset[tuple[str, object]]]]:
    """Cached: each protected request compares against the same Security-Server again. Every
    tunnel has its own text, so the cache holds the phones a worker serves now. An entry is
    ~2.7 KB (frozensets, measured): the 4,096 entries this cache had come to ~11 MB a worker
    once full (computed), filled slowly as tunnels re-key (`make soak` grew until a
    smaller cache, README: Soak)."""
    return _canonical([value])


def verify_matches(verify_values: str | list[str] | None, sent_server: str) -> bool:
    """Whether the phone's Security-Verify repeats the Security-Server we sent (RFC 3329 2.3.1).

    Compared as a set of mechanisms with their parameter sets, so case, order, whitespace and
    quoting do not matter; a missing, empty or malformed Security-Verify does not match.
    """
    if isinstance(verify_values, str) and verify_values.strip() == sent_server:
        return True  # the phone echoed it verbatim, as most do
    try:
        sent = _canonical(sent_server)
    except SecAgreeError as err:
        raise ValueError("the Security-Server we sent does not parse") from err
    if not verify_values:
        return False
    try:
        return _canonical(verify_values) == sent
    except SecAgreeError:
        return False


# --- Writing ----------------------------------------------------------------------------------


def format_security_server(
    alg: str, ealg: str, spi_c: int, spi_s: int, port_c: int, port_s: int, q: str = "0.1"
) -> str:
    """Our Security-Server value, parameters in the C module's order, SPIs unsigned."""
    if not is_valid_pair(alg, ealg):
        raise ValueError(f"cannot serve alg={alg!r} ealg={ealg!r}")
    if not all(0 <= spi <= MAX_SPI for spi in (spi_c, spi_s)):
        raise ValueError("SPI out of range 0..2^32-1")
    if not all(0 <= port <= MAX_PORT for port in (port_c, port_s)):
        raise ValueError("port out of range 0..65535")
    if not _qvalue.fullmatch(q):
        raise ValueError(f"q {q!r} is not a qvalue")
    return (
        f"{IPSEC_3GPP};q={q};prot=esp;mod=trans;spi-c={spi_c:d};spi-s={spi_s:d};"
        f"port-c={port_c:d};port-s={port_s:d};alg={alg};ealg={ealg}"
    )


# --- WWW-Authenticate: the AKA keys (TS 33.203 section 7.2, TS 24.229 5.2.2.1) ---------------

_AKA_KEYS = ("ck", "ik")


def _challenge_params(value: str) -> list[tuple[str, str, int, int]]:
    """challenge = auth-scheme LWS auth-param *(COMMA auth-param): (name, raw, start, end) each.

    Errors give only positions: this text carries the keys.
    """
    scheme = _token.match(value, len(value) - len(value.lstrip(" \t")))
    if not scheme:
        raise SecAgreeError("WWW-Authenticate has no auth-scheme")
    params, pos = [], _sws.match(value, scheme.end()).end()
    end = len(value.rstrip(" \t\r\n"))
    while True:
        name = _token.match(value, pos)
        equal = name and _equal.match(value, name.end())
        raw = equal and _auth_value.match(value, equal.end())
        if not raw:
            raise SecAgreeError(f"WWW-Authenticate: malformed auth-param at offset {pos}")
        params.append((name.group().lower(), raw.group(), pos, raw.end()))
        pos = raw.end()
        if pos == end:
            return params
        comma = _comma.match(value, pos)
        if not comma:
            raise SecAgreeError(f"WWW-Authenticate: expected ',' at offset {pos}")
        pos = comma.end()


def _aka_key(params: list[tuple[str, str, int, int]], which: str) -> bytes:
    found = [raw for name, raw, _, _ in params if name == which]
    if not found:
        raise SecAgreeError(f"WWW-Authenticate has no {which}")
    if len(found) > 1:
        raise SecAgreeError(f"WWW-Authenticate has {which} more than once")
    hex_digits = _unquote(found[0])
    if not _lhex32.fullmatch(hex_digits):
        raise SecAgreeError(f"WWW-Authenticate {which} is not 32 hex digits")
    return bytes.fromhex(hex_digits)


def _without(value: str, params: list[tuple[str, str, int, int]], drop: set[int]) -> str:
    """`value` minus the dropped params, each with the separator that joined it to the list."""
    cuts = []
    for i in sorted(drop):
        _, _, start, end = params[i]
        if any(j not in drop for j in range(i)):
            cuts.append((params[i - 1][3], end))
        elif i + 1 < len(params):
            cuts.append((start, params[i + 1][2]))
        else:
            cuts.append((start, end))
    out, pos = [], 0
    for start, end in cuts:
        out.append(value[pos:start])
        pos = max(pos, end)
    return "".join(out) + value[pos:]


def extract_ck_ik(www_authenticate: str) -> tuple[bytes, bytes, str]:
    """CK and IK from the S-CSCF's challenge, and the challenge without them for the phone.

    TS 33.203: the keys stop at the P-CSCF; the C module left their removal to the script.
    Everything but the two parameters (and their separators) is returned byte-identical.
    """
    params = _challenge_params(www_authenticate)
    ck, ik = (_aka_key(params, which) for which in _AKA_KEYS)
    drop = {i for i, (name, *_) in enumerate(params) if name in _AKA_KEYS}
    return ck, ik, _without(www_authenticate, params, drop)
