"""ipsec.secagree: RFC 3329 / TS 33.203 Annex H reading, offer choice, writing, WWW-Authenticate."""
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ipsec.algorithms import AUTH_ALGS, ENC_ALGS, VALID_PAIRS
from ipsec.secagree import (
    Offer,
    SecAgreeError,
    choose_offer,
    extract_ck_ik,
    format_security_server,
    parse_security_header,
    verify_matches,
)

PORTS = "spi-c=1111;spi-s=2222;port-c=5062;port-s=5063"


def offer(alg: str = "hmac-sha-1-96", ealg: str = "null", **kw: object) -> Offer:
    fields = dict(spi_c=1111, spi_s=2222, port_c=5062, port_s=5063) | kw
    return Offer(alg=alg, ealg=ealg, **fields)  # type: ignore[arg-type]


# --- parse_security_header ----------------------------------------------------------------------


def test_one_full_mechanism() -> None:
    value = (
        "ipsec-3gpp;q=0.1;prot=esp;mod=trans;spi-c=4157622753;spi-s=4157622754;"
        "port-c=50858;port-s=54858;alg=hmac-sha-1-96;ealg=aes-cbc"
    )
    assert parse_security_header(value) == [
        Offer("hmac-sha-1-96", "aes-cbc", "esp", "trans", 4157622753, 4157622754, 50858, 54858, "0.1")
    ]


def test_defaults_of_absent_parameters() -> None:
    # Legacy phones omit ealg: TS 33.203 says that means null.
    [got] = parse_security_header("ipsec-3gpp;alg=hmac-md5-96")
    assert got == Offer("hmac-md5-96", "null", "esp", "trans", None, None, None, None, None)
    [got] = parse_security_header("ipsec-3gpp")
    assert got.alg == "" and got.ealg == "null"


def test_several_mechanisms_and_several_headers_in_order() -> None:
    got = parse_security_header(
        [
            "ipsec-3gpp;alg=hmac-md5-96;" + PORTS + ", ipsec-3gpp;alg=hmac-sha-1-96;" + PORTS,
            "ipsec-3gpp;alg=aes-gmac;" + PORTS,
        ]
    )
    assert [o.alg for o in got] == ["hmac-md5-96", "hmac-sha-1-96", "aes-gmac"]


def test_other_mechanisms_are_ignored_wherever_they_are() -> None:
    got = parse_security_header(
        [
            'digest;d-alg=md5;d-qop=auth-int;d-ver="0123456789abcdef0123456789abcdef";q=0.5',
            "tls;q=0.2, ipsec-ike;q=0.3,ipsec-3gpp;alg=hmac-md5-96;" + PORTS + ",ipsec-man",
            "digest;q=7;x=[2001:db8::1];flag",
        ]
    )
    assert [o.alg for o in got] == ["hmac-md5-96"]


def test_names_and_words_in_any_case() -> None:
    [got] = parse_security_header(
        "IPSec-3GPP;ALG=HMAC-SHA-1-96;EAlg=AES-CBC;PROT=ESP;MOD=Trans;SPI-C=1;Spi-S=2;PORT-C=3;port-S=4"
    )
    assert got == Offer("hmac-sha-1-96", "aes-cbc", "esp", "trans", 1, 2, 3, 4)


def test_whitespace_around_separators_and_folded_lines() -> None:
    value = (
        "  ipsec-3gpp ; alg = hmac-md5-96\t;\tspi-c= 1 ;spi-s =2;\r\n port-c=3;port-s=4 ,\r\n\t"
        "ipsec-3gpp;alg=null;ealg=aes-gcm;" + PORTS + "\r\n"
    )
    got = parse_security_header(value)
    assert got[0] == Offer("hmac-md5-96", "null", "esp", "trans", 1, 2, 3, 4)
    assert (got[1].alg, got[1].ealg) == ("null", "aes-gcm")


def test_quoted_values() -> None:
    [got] = parse_security_header(
        'ipsec-3gpp;alg="hmac-sha-1-96";ealg="des-ede3-cbc";spi-c="1";spi-s="2";'
        'port-c="3";port-s="4";q="0.5";prot="esp";mod="tr\\ans";x="a, b; c=d"'
    )
    assert got == Offer("hmac-sha-1-96", "des-ede3-cbc", "esp", "trans", 1, 2, 3, 4, "0.5")


def test_unknown_parameters_are_ignored() -> None:
    [got] = parse_security_header("ipsec-3gpp;alg=hmac-md5-96;future=1;flag;other=\"x\";" + PORTS)
    assert got == offer("hmac-md5-96")


def test_values_are_kept_for_the_choice_to_judge() -> None:
    [got] = parse_security_header("ipsec-3gpp;alg=HMAC-SHA-256;ealg=AES-CTR;prot=AH;mod=UDP-enc-tun")
    assert (got.alg, got.ealg, got.prot, got.mod) == ("hmac-sha-256", "aes-ctr", "ah", "udp-enc-tun")


@pytest.mark.parametrize(
    ("param", "text"),
    [("spi-c", "0"), ("spi-s", "4294967295"), ("spi-c", "0000000001"), ("port-c", "0"), ("port-s", "65535")],
)
def test_numeric_bounds_accepted(param: str, text: str) -> None:
    [got] = parse_security_header(f"ipsec-3gpp;{param}={text}")
    assert getattr(got, param.replace("-", "_")) == int(text)


@pytest.mark.parametrize(
    ("param", "text"),
    [
        ("spi-c", "4294967296"),
        ("spi-s", "00000000001"),
        ("spi-c", "-1"),
        ("spi-s", "+1"),
        ("spi-c", "1_0"),
        ("spi-c", '"١٢"'),
        ("spi-c", "0x10"),
        ("spi-s", '""'),
        ("port-c", "65536"),
        ("port-s", "000001"),
        ("port-c", "5e3"),
        ("port-s", '" 5063"'),
        ("q", "1.5"),
        ("q", "0.1234"),
        ("q", "2"),
        ("q", ".5"),
        ("q", "1.001"),
    ],
)
def test_numeric_ranges_enforced_and_named(param: str, text: str) -> None:
    with pytest.raises(SecAgreeError, match=f"^{re.escape(param)} "):
        parse_security_header(f"ipsec-3gpp;alg=hmac-md5-96;{param}={text}")


def test_numbers_are_checked_only_in_ipsec_3gpp() -> None:
    assert parse_security_header("digest;q=9;spi-c=99999999999;port-c=x") == []


@pytest.mark.parametrize("param", ["alg", "ealg", "prot", "mod", "spi-c", "spi-s", "port-c", "port-s", "q"])
def test_known_parameter_without_value(param: str) -> None:
    with pytest.raises(SecAgreeError, match=f"parameter {param} has no value"):
        parse_security_header(f"ipsec-3gpp;{param}")


def test_known_parameter_twice_is_ambiguous() -> None:
    with pytest.raises(SecAgreeError, match="spi-c given twice"):
        parse_security_header("ipsec-3gpp;spi-c=1;SPI-C=2")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "  ",
        ",",
        "ipsec-3gpp,",
        "ipsec-3gpp,,tls",
        "ipsec-3gpp;",
        "ipsec-3gpp;alg=",
        "ipsec-3gpp;=1",
        "ipsec-3gpp alg=hmac-md5-96",
        'ipsec-3gpp;alg="hmac-md5-96',
        "ipsec-3gpp;alg=hmac md5",
        "ipsec-3gpp;alg=a\x00b",
        "ipsec-3gpp;\r\nalg=x",
        "ipsec-3gpp;alg=(x)",
        "ipsec\u00e9-3gpp",
        'ipsec-3gpp;x="\r\n"',
    ],
)
def test_malformed_structure(value: str) -> None:
    with pytest.raises(SecAgreeError):
        parse_security_header(value)


def test_error_names_the_place() -> None:
    with pytest.raises(SecAgreeError, match="expected ';' or ',' at ' alg=hmac"):
        parse_security_header("ipsec-3gpp alg=hmac-md5-96")
    with pytest.raises(SecAgreeError, match="bad value for parameter 'alg'"):
        parse_security_header("ipsec-3gpp;alg=")


def test_error_is_a_value_error_and_no_headers_no_offers() -> None:
    assert issubclass(SecAgreeError, ValueError)
    assert parse_security_header([]) == []


# --- choose_offer -------------------------------------------------------------------------------


def test_no_preference_takes_the_last_usable() -> None:
    offers = [offer("hmac-md5-96"), offer("hmac-sha-1-96", "aes-cbc"), offer("hmac-sha-256")]
    assert choose_offer(offers) == offers[1]


@pytest.mark.parametrize(
    "bad",
    [
        offer("hmac-sha-256"),
        offer("hmac-md5-96", "aes-ctr"),
        offer("", "null"),
        offer("hmac-md5-96", "aes-gcm"),
        offer("null", "null"),
        offer(prot="ah"),
        offer(mod="tun"),
        offer(mod="udp-enc-tun"),
        offer(spi_c=None),
        offer(spi_s=None),
        offer(port_c=None),
        offer(port_s=None),
        offer(spi_c=0),
        offer(port_s=0),
    ],
)
def test_offers_we_cannot_serve_are_skipped(bad: Offer) -> None:
    good = offer("hmac-md5-96", "aes-cbc")
    assert choose_offer([good, bad]) == good
    assert choose_offer([bad, good], "hmac-sha-1-96") == good
    with pytest.raises(SecAgreeError, match="^no usable ipsec-3gpp offer"):
        choose_offer([bad])


def test_nothing_usable_says_why() -> None:
    with pytest.raises(SecAgreeError) as err:
        choose_offer([offer("hmac-sha-256"), offer(prot="ah"), offer(port_c=None)])
    assert str(err.value) == (
        "no usable ipsec-3gpp offer (#1 unknown alg 'hmac-sha-256'; #2 prot 'ah' is not esp; "
        "#3 port-c missing or 0)"
    )
    with pytest.raises(SecAgreeError, match="none offered"):
        choose_offer([])


OFFERS = [
    offer("hmac-md5-96", "null", spi_c=1),
    offer("hmac-sha-1-96", "des-ede3-cbc", spi_c=2),
    offer("hmac-md5-96", "aes-cbc", spi_c=3),
    offer("hmac-sha-1-96", "null", spi_c=4),
    offer("hmac-sha-1-96", "aes-cbc", prot="ah", spi_c=5),
]


@pytest.mark.parametrize(
    ("alg", "ealg", "spi_c"),
    [
        ("", "", 4),
        ("hmac-md5-96", "", 1),
        ("hmac-sha-1-96", "", 2),
        ("", "aes-cbc", 3),  # ealg alone is honoured (the C module needed alg set too)
        ("", "null", 1),
        ("", "des-ede3-cbc", 2),
        ("hmac-sha-1-96", "null", 4),
        ("hmac-md5-96", "aes-cbc", 3),
        ("HMAC-SHA-1-96", "NULL", 4),
        ("hmac-sha-1-96", "aes-cbc", 4),  # only offered with prot=ah: no match, fall back to last
        ("aes-gmac", "", 4),
        ("", "aes-gcm", 4),
    ],
)
def test_preferences(alg: str, ealg: str, spi_c: int) -> None:
    assert choose_offer(OFFERS, alg, ealg).spi_c == spi_c


# --- format_security_server ---------------------------------------------------------------------


def test_format_as_the_c_module_with_unsigned_spis() -> None:
    assert format_security_server("hmac-sha-1-96", "aes-cbc", 4294967295, 2147483648, 5062, 5063) == (
        "ipsec-3gpp;q=0.1;prot=esp;mod=trans;spi-c=4294967295;spi-s=2147483648;"
        "port-c=5062;port-s=5063;alg=hmac-sha-1-96;ealg=aes-cbc"
    )
    assert format_security_server("null", "aes-gcm", 0, 1, 2, 3, q="1").startswith("ipsec-3gpp;q=1;")


@pytest.mark.parametrize(
    "args",
    [
        ("hmac-sha-1-96", "aes-cbc", 2**32, 1, 2, 3),
        ("hmac-sha-1-96", "aes-cbc", -1, 1, 2, 3),
        ("hmac-sha-1-96", "aes-cbc", 1, 1, 65536, 3),
        ("hmac-sha-1-96", "", 1, 1, 2, 3),
        ("hmac-md5-96", "aes-gcm", 1, 1, 2, 3),
        ("HMAC-SHA-1-96", "null", 1, 1, 2, 3),
        ("hmac-sha-1-96", "null", 1, 1, 2, 3, "0.1;x"),
    ],
)
def test_format_rejects_our_own_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError) as err:
        format_security_server(*args)
    assert not isinstance(err.value, SecAgreeError)  # our bug, not the phone's


# --- verify_matches -----------------------------------------------------------------------------

SENT = format_security_server("hmac-sha-1-96", "aes-cbc", 3000000000, 3000000001, 5062, 5063)


@pytest.mark.parametrize(
    "verify",
    [
        SENT,
        [SENT],
        SENT.upper(),
        " ipsec-3gpp ; ealg = aes-cbc;alg=\"hmac-sha-1-96\";port-s=5063;port-c=5062;\r\n spi-s=3000000001;"
        "spi-c=3000000000;mod=trans;prot=esp;q=0.10",
        "ipsec-3gpp;q=0.1;prot=esp;mod=trans;spi-c=\"3000000000\";spi-s=3000000001;"
        "port-c=5062;port-s=05063;alg=hmac-sha-1-96;ealg=aes-cbc",
        [SENT, SENT],
    ],
)
def test_verify_tolerates_case_order_whitespace_quotes(verify: str | list[str]) -> None:
    assert verify_matches(verify, SENT)


@pytest.mark.parametrize(
    "verify",
    [
        None,
        "",
        [],
        SENT.replace("spi-c=3000000000", "spi-c=3000000002"),
        SENT.replace(";ealg=aes-cbc", ""),
        SENT + ";x=1",
        SENT + ", tls",
        [SENT, "digest"],
        SENT.replace("aes-cbc", "null"),
        SENT.replace("q=0.1", "q=0.2"),
        SENT + ";",
        "ipsec-3gpp;spi-c=99999999999",
    ],
)
def test_verify_mismatch(verify: str | list[str] | None) -> None:
    assert not verify_matches(verify, SENT)


def test_verify_blames_us_for_a_bad_sent_value() -> None:
    with pytest.raises(ValueError) as err:
        verify_matches(SENT, "ipsec-3gpp;")
    assert not isinstance(err.value, SecAgreeError)


# --- extract_ck_ik ------------------------------------------------------------------------------

CK_HEX = "b40ba9a3c58b2a05bbf0d987b21bf8cb"
IK_HEX = "f769bcd751044604127672711c6d3441"
CK = bytes.fromhex(CK_HEX)
IK = bytes.fromhex(IK_HEX)


@pytest.mark.parametrize(
    ("value", "stripped"),
    [
        (
            'Digest realm="ims.mnc001.mcc001.3gppnetwork.org",nonce="ZGVhZGJlZWY=",'
            f'algorithm=AKAv1-MD5,qop="auth,auth-int",ck="{CK_HEX}",ik="{IK_HEX}"',
            'Digest realm="ims.mnc001.mcc001.3gppnetwork.org",nonce="ZGVhZGJlZWY=",'
            'algorithm=AKAv1-MD5,qop="auth,auth-int"',
        ),
        (
            f'Digest CK={CK_HEX.upper()} , realm="r", IK = "{IK_HEX}",\tnonce="n"',
            'Digest realm="r",\tnonce="n"',
        ),
        (
            f'Digest ik="{IK_HEX}", ck="{CK_HEX}", realm="r", nonce="ck={CK_HEX}"',
            f'Digest realm="r", nonce="ck={CK_HEX}"',
        ),
        (
            f'Digest realm="r", Ck="{CK_HEX}", nonce="n", iK="{IK_HEX}", opaque="o"  ',
            'Digest realm="r", nonce="n", opaque="o"  ',
        ),
        (
            f'  Digest realm="r",\r\n ck="{CK_HEX}",\r\n ik="{IK_HEX}"\r\n',
            '  Digest realm="r"\r\n',
        ),
    ],
)
def test_extract_and_strip(value: str, stripped: str) -> None:
    assert extract_ck_ik(value) == (CK, IK, stripped)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f'Digest realm="r", ik="{IK_HEX}"', "WWW-Authenticate has no ck"),
        (f'Digest realm="r", ck="{CK_HEX}"', "WWW-Authenticate has no ik"),
        (f'Digest realm="r", ck="{CK_HEX[:-1]}", ik="{IK_HEX}"', "WWW-Authenticate ck is not 32 hex digits"),
        (f'Digest realm="r", ck="{CK_HEX}", ik="{IK_HEX}0"', "WWW-Authenticate ik is not 32 hex digits"),
        (f'Digest ck="{CK_HEX[:-1]}g", ik="{IK_HEX}"', "WWW-Authenticate ck is not 32 hex digits"),
        (f'Digest ck="{CK_HEX[:16]} {CK_HEX[16:]}", ik="{IK_HEX}"', "WWW-Authenticate ck is not 32 hex digits"),
        (f"Digest ck={CK_HEX}, ik={IK_HEX}, ck={CK_HEX}", "WWW-Authenticate has ck more than once"),
        (f'Digest realm="r" ck="{CK_HEX}", ik="{IK_HEX}"', "WWW-Authenticate: expected ',' at offset 16"),
        (f'Digest realm="r", ck="{CK_HEX}, ik="{IK_HEX}"', "WWW-Authenticate: expected ',' at offset"),
        (f'Digest realm="r",, ck="{CK_HEX}"', "WWW-Authenticate: malformed auth-param at offset 17"),
        ("", "WWW-Authenticate has no auth-scheme"),
        (f'"Digest" ck={CK_HEX}', "WWW-Authenticate has no auth-scheme"),
    ],
)
def test_extract_errors_name_which_but_never_the_value(value: str, message: str) -> None:
    with pytest.raises(SecAgreeError) as err:
        extract_ck_ik(value)
    assert str(err.value).startswith(message)
    for secret in (CK_HEX, IK_HEX, CK_HEX[:8], IK_HEX[:8], CK_HEX[-8:], IK_HEX[-8:]):
        assert secret not in str(err.value).lower()


# --- properties ---------------------------------------------------------------------------------

spis = st.integers(0, 2**32 - 1)
ports = st.integers(0, 65535)
qvalues = st.from_regex(r"\A(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\Z")
pairs = st.sampled_from(sorted(VALID_PAIRS))


@settings(max_examples=200, deadline=None)
@given(pairs, spis, spis, ports, ports, qvalues)
def test_format_then_parse_is_identity(
    pair: tuple[str, str], spi_c: int, spi_s: int, port_c: int, port_s: int, q: str
) -> None:
    sent = format_security_server(*pair, spi_c, spi_s, port_c, port_s, q)
    assert parse_security_header(sent) == [Offer(*pair, "esp", "trans", spi_c, spi_s, port_c, port_s, q)]
    assert verify_matches(sent, sent)
    if 0 not in (spi_c, spi_s, port_c, port_s):
        assert choose_offer(parse_security_header(sent)) == parse_security_header(sent)[0]


def _styled(draw: st.DrawFn, name: str, value: str) -> str:
    """One parameter written in a random legal style: case, spacing, quoting."""
    sws = st.sampled_from(["", " ", "\t", "  ", "\r\n ", " \r\n\t"])
    name = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    if draw(st.booleans()):
        value = value.upper()
    if draw(st.booleans()):
        value = f'"{value}"'
    return f"{draw(sws)};{draw(sws)}{name}{draw(sws)}={draw(sws)}{value}"


@st.composite
def styled_mechanisms(draw: st.DrawFn) -> tuple[str, Offer]:
    alg = draw(st.sampled_from(AUTH_ALGS + ("hmac-sha-256",)))
    ealg = draw(st.sampled_from(ENC_ALGS + ("aes-ctr",)))
    fields = {
        "alg": alg,
        "ealg": ealg,
        "prot": draw(st.sampled_from(["esp", "ah"])),
        "mod": draw(st.sampled_from(["trans", "tun", "udp-enc-tun"])),
        "spi-c": str(draw(spis)),
        "spi-s": str(draw(spis)),
        "port-c": str(draw(ports)),
        "port-s": str(draw(ports)),
        "q": draw(qvalues),
        "x-unknown": "Whatever",
    }
    names = draw(st.permutations(list(fields)))
    text = "".join(_styled(draw, n, fields[n]) for n in names)
    expected = Offer(
        alg, ealg, fields["prot"], fields["mod"], *(int(fields[n]) for n in ("spi-c", "spi-s", "port-c", "port-s")),
        q=fields["q"],
    )
    return draw(st.sampled_from(["ipsec-3gpp", "IPSEC-3GPP", "IpSec-3gpp"])) + text, expected


@settings(max_examples=150, deadline=None)
@given(st.lists(styled_mechanisms(), min_size=1, max_size=4), st.integers(1, 3), st.data())
def test_any_legal_style_parses_the_same(
    mechs: list[tuple[str, Offer]], headers: int, data: st.DataObject
) -> None:
    texts = [t for t, _ in mechs] + ['digest;d-alg=md5;d-ver="x"', "tls"]
    texts = data.draw(st.permutations(texts))
    cut = sorted(data.draw(st.lists(st.integers(0, len(texts)), min_size=headers - 1, max_size=headers - 1)))
    values = [" , ".join(texts[a:b]) for a, b in zip([0, *cut], [*cut, len(texts)]) if a < b]
    got = parse_security_header(values)
    assert sorted(got, key=repr) == sorted((o for _, o in mechs), key=repr)


@settings(max_examples=100, deadline=None)
@given(styled_mechanisms())
def test_a_restyled_verify_matches(mech: tuple[str, Offer]) -> None:
    text, o = mech
    sent = (
        f"ipsec-3gpp;q={o.q};prot={o.prot};mod={o.mod};spi-c={o.spi_c};spi-s={o.spi_s};"
        f"port-c={o.port_c};port-s={o.port_s};alg={o.alg};ealg={o.ealg};x-unknown=whatever"
    )
    assert verify_matches(text, sent)


# Text built from the grammar's own characters reaches deeper than arbitrary unicode.
grammarish = st.text(alphabet=st.sampled_from(list('ipsec-3gpdigtl;=,"\\ \t\r\n0123456789qakmorx.é\x00')), max_size=80)
anytext = st.one_of(st.text(max_size=80), grammarish)


@settings(max_examples=300, deadline=None)
@given(st.lists(anytext, max_size=3), st.sampled_from(["", "hmac-md5-96"]), st.sampled_from(["", "null"]))
@example(['ipsec-3gpp;spi-c="\u0661"'], "", "")
def test_security_parsers_raise_only_their_error(values: list[str], alg: str, ealg: str) -> None:
    try:
        choose_offer(parse_security_header(values), alg, ealg)
    except SecAgreeError:
        pass
    assert verify_matches(values, SENT) in (True, False)


@settings(max_examples=300, deadline=None)
@given(anytext)
@example("Digest ck=,ik=")
def test_extract_raises_only_its_error(value: str) -> None:
    try:
        ck, ik, rest = extract_ck_ik(value)
    except SecAgreeError:
        return
    assert len(ck) == len(ik) == 16 and len(rest) < len(value)


auth_values = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9\-.!%*_+`'~]{1,12}\Z"),
    st.from_regex(r'\A"[ !#-\[\]-~]{0,12}"\Z'),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["realm", "nonce", "algorithm", "qop", "opaque", "x"]), auth_values), max_size=5),
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16),
    st.data(),
)
def test_extract_keeps_everything_else(
    others: list[tuple[str, str]], ck: bytes, ik: bytes, data: st.DataObject
) -> None:
    kept = [f"{n}={v}" for n, v in others]
    keys = [f'ck="{ck.hex()}"', f"IK={ik.hex().upper()}"]
    params = data.draw(st.permutations(kept + keys))
    seps = [data.draw(st.sampled_from([",", ", ", " ,\t", ",\r\n "])) for _ in params]
    value = "Digest " + "".join(s + p for s, p in zip(["", *seps], params))
    got_ck, got_ik, rest = extract_ck_ik(value)
    assert (got_ck, got_ik) == (ck, ik)
    remaining = [p for p in params if p not in keys]

    def separators_as_commas(text: str) -> str:
        return re.sub(r"[ \t\r\n]*,[ \t\r\n]*", ",", text)

    # Only the two params and one separator each went: the rest is the rest, verbatim.
    assert separators_as_commas(rest) == separators_as_commas("Digest " + ",".join(remaining))
    assert rest.startswith("Digest ")
