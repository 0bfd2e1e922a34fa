"""Real-phone style Security-Client offers and the offer each preference setting must choose.

The patterns follow what phones send in the field: one header per mechanism or all in one,
md5 and sha1 crossed with null/aes-cbc/des-ede3-cbc, legacy offers without ealg, digest/tls
mechanisms around them, quoted values and odd case. Expected choices are written by hand from
the rules: no preference = last usable offer; a preference = first usable offer satisfying it;
no offer satisfies it = last usable offer.
"""
import pytest

from ipsec.secagree import Offer, choose_offer, parse_security_header

SHORT = {
    "md5": "hmac-md5-96",
    "sha1": "hmac-sha-1-96",
    "gmac": "aes-gmac",
    "aes": "aes-cbc",
    "3des": "des-ede3-cbc",
    "gcm": "aes-gcm",
    "null": "null",
    "": "",
}

# (ipsec_preferred_alg, ipsec_preferred_ealg), in the order of each case's expected row.
SETTINGS = [
    ("", ""),
    ("sha1", ""),
    ("md5", ""),
    ("gmac", ""),
    ("", "null"),
    ("", "aes"),
    ("", "3des"),
    ("", "gcm"),
    ("sha1", "aes"),
    ("md5", "3des"),
]

CORPUS = {
    # One header per mechanism, sha1 first, large SPIs, parameters in the phone's own order.
    "samsung-style, header per mechanism": (
        [
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;mod=trans;port-c=65529;port-s=65528;prot=esp;spi-c=3245284517;spi-s=3245284516",
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=null;mod=trans;port-c=65529;port-s=65528;prot=esp;spi-c=3245284519;spi-s=3245284518",
            "ipsec-3gpp;alg=hmac-md5-96;ealg=aes-cbc;mod=trans;port-c=65529;port-s=65528;prot=esp;spi-c=3245284521;spi-s=3245284520",
            "ipsec-3gpp;alg=hmac-md5-96;ealg=null;mod=trans;port-c=65529;port-s=65528;prot=esp;spi-c=3245284523;spi-s=3245284522",
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=des-ede3-cbc;mod=trans;port-c=65529;port-s=65528;prot=esp;spi-c=3245284525;spi-s=3245284524",
            "ipsec-3gpp;alg=hmac-md5-96;ealg=des-ede3-cbc;mod=trans;port-c=65529;port-s=65528;prot=esp;spi-c=3245284527;spi-s=3245284526",
        ],
        ["md5/3des", "sha1/aes", "md5/aes", "md5/3des", "sha1/null", "sha1/aes", "sha1/3des", "md5/3des", "sha1/aes", "md5/3des"],
    ),
    # All six in one header, comma separated, md5 first, no prot/mod (defaults esp/trans).
    "iphone-style, one header": (
        [
            "ipsec-3gpp;alg=hmac-md5-96;ealg=des-ede3-cbc;spi-c=213473181;spi-s=213473180;port-c=49347;port-s=49346,"
            "ipsec-3gpp;alg=hmac-md5-96;ealg=aes-cbc;spi-c=213473181;spi-s=213473180;port-c=49347;port-s=49346,"
            "ipsec-3gpp;alg=hmac-md5-96;ealg=null;spi-c=213473181;spi-s=213473180;port-c=49347;port-s=49346,"
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=des-ede3-cbc;spi-c=213473181;spi-s=213473180;port-c=49347;port-s=49346,"
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;spi-c=213473181;spi-s=213473180;port-c=49347;port-s=49346,"
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=null;spi-c=213473181;spi-s=213473180;port-c=49347;port-s=49346"
        ],
        ["sha1/null", "sha1/3des", "md5/3des", "sha1/null", "md5/null", "md5/aes", "md5/3des", "sha1/null", "sha1/aes", "md5/3des"],
    ),
    # Legacy phones: no ealg (means null), a space after each semicolon and comma.
    "legacy, no ealg": (
        [
            "ipsec-3gpp; alg=hmac-md5-96; spi-c=1234; spi-s=1235; port-c=5064; port-s=5066, "
            "ipsec-3gpp; alg=hmac-sha-1-96; spi-c=1234; spi-s=1235; port-c=5064; port-s=5066"
        ],
        ["sha1/null", "sha1/null", "md5/null", "sha1/null", "md5/null", "sha1/null", "sha1/null", "sha1/null", "sha1/null", "sha1/null"],
    ),
    # digest and tls first, in headers of their own: the C module read only the first header.
    "digest and tls first, ipsec in later headers": (
        [
            "digest;d-alg=md5;d-qop=auth;q=0.2",
            "tls;q=0.1",
            "ipsec-3gpp;q=0.5;alg=hmac-sha-1-96;ealg=aes-cbc;prot=esp;mod=trans;spi-c=5001;spi-s=5002;port-c=31000;port-s=31001",
            "ipsec-3gpp;q=0.5;alg=hmac-sha-1-96;ealg=null;prot=esp;mod=trans;spi-c=5003;spi-s=5004;port-c=31000;port-s=31001",
        ],
        ["sha1/null", "sha1/aes", "sha1/null", "sha1/null", "sha1/null", "sha1/aes", "sha1/null", "sha1/null", "sha1/aes", "sha1/null"],
    ),
    # Upper case, quoted values, spaces around every separator, a folded line, trailing CRLF.
    "quoted, odd case, folded": (
        [
            'IPSEC-3GPP ; ALG = "HMAC-SHA-1-96" ; EALG="AES-CBC" ; PROT=ESP ; MOD=Trans ; '
            'SPI-C="4294967295" ; SPI-S="4294967294" ; PORT-C=65535 ; PORT-S="1" ,\r\n '
            'ipsec-3gpp;Alg="hmac-md5-96";Ealg="NULL";Spi-C=77;Spi-S=78;Port-C=6000;Port-S=6001\r\n'
        ],
        ["md5/null", "sha1/aes", "md5/null", "md5/null", "md5/null", "sha1/aes", "md5/null", "md5/null", "sha1/aes", "md5/null"],
    ),
    # Newer phones: the AES-GCM based AEADs first, then the classic pairs.
    "gcm and gmac first": (
        [
            "ipsec-3gpp;alg=null;ealg=aes-gcm;prot=esp;mod=trans;spi-c=9001;spi-s=9002;port-c=40001;port-s=40002",
            "ipsec-3gpp;alg=aes-gmac;ealg=null;prot=esp;mod=trans;spi-c=9003;spi-s=9004;port-c=40001;port-s=40002",
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;prot=esp;mod=trans;spi-c=9005;spi-s=9006;port-c=40001;port-s=40002",
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=null;prot=esp;mod=trans;spi-c=9007;spi-s=9008;port-c=40001;port-s=40002",
        ],
        ["sha1/null", "sha1/aes", "sha1/null", "gmac/null", "gmac/null", "sha1/aes", "sha1/null", "null/gcm", "sha1/aes", "sha1/null"],
    ),
    # Offers we cannot serve around two we can: ah, tunnel modes, unknown algorithms, a
    # missing port; the usable ones are sha1/aes-cbc (2nd) and md5/null (7th).
    "unservable offers mixed in": (
        [
            "ipsec-3gpp;alg=hmac-md5-96;ealg=aes-cbc;prot=ah;mod=trans;spi-c=11;spi-s=12;port-c=7001;port-s=7002",
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;prot=esp;mod=trans;spi-c=13;spi-s=14;port-c=7001;port-s=7002",
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;prot=esp;mod=tun;spi-c=15;spi-s=16;port-c=7001;port-s=7002",
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=aes-cbc;prot=esp;mod=UDP-enc-tun;spi-c=17;spi-s=18;port-c=7001;port-s=7002",
            "ipsec-3gpp;alg=hmac-sha-256-128;ealg=aes-cbc;prot=esp;mod=trans;spi-c=19;spi-s=20;port-c=7001;port-s=7002",
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=des-ede3-cbc;prot=esp;mod=trans;spi-c=21;spi-s=22;port-c=7001",
            "ipsec-3gpp;alg=hmac-md5-96;ealg=null;prot=esp;mod=trans;spi-c=23;spi-s=24;port-c=7001;port-s=7002",
            "ipsec-3gpp;alg=hmac-sha-1-96;ealg=null;prot=ah;mod=trans;spi-c=25;spi-s=26;port-c=7001;port-s=7002",
        ],
        ["md5/null", "sha1/aes", "md5/null", "md5/null", "md5/null", "sha1/aes", "md5/null", "md5/null", "sha1/aes", "md5/null"],
    ),
    # Everything in one header: q values, digest and tls between the ipsec-3gpp offers.
    "mixed mechanisms in one header": (
        [
            "digest;d-alg=md5;q=0.1, ipsec-3gpp;q=0.9;alg=hmac-md5-96;ealg=aes-cbc;spi-c=600;spi-s=601;"
            "port-c=8001;port-s=8002, tls;q=0.2, ipsec-3gpp;q=0.8;alg=hmac-md5-96;ealg=des-ede3-cbc;"
            "spi-c=602;spi-s=603;port-c=8001;port-s=8002"
        ],
        ["md5/3des", "md5/3des", "md5/aes", "md5/3des", "md5/3des", "md5/aes", "md5/3des", "md5/3des", "md5/3des", "md5/3des"],
    ),
}

CASES = [
    pytest.param(headers, setting, expected, id=f"{name}|{setting[0] or '-'}/{setting[1] or '-'}")
    for name, (headers, row) in CORPUS.items()
    for setting, expected in zip(SETTINGS, row, strict=True)
]


def _usable(offer: Offer) -> bool:
    ports = (offer.spi_c, offer.spi_s, offer.port_c, offer.port_s)
    return offer.prot == "esp" and offer.mod == "trans" and all(ports)


@pytest.mark.parametrize(("headers", "setting", "expected"), CASES)
def test_choice(headers: list[str], setting: tuple[str, str], expected: str) -> None:
    offers = parse_security_header(headers)
    chosen = choose_offer(offers, SHORT[setting[0]], SHORT[setting[1]])
    alg, ealg = expected.split("/")
    assert (chosen.alg, chosen.ealg) == (SHORT[alg], SHORT[ealg])
    assert _usable(chosen) and chosen in offers


@pytest.mark.parametrize("headers", [headers for headers, _ in CORPUS.values()], ids=list(CORPUS))
def test_one_header_or_many_read_the_same(headers: list[str]) -> None:
    joined = ", ".join(h.strip() for h in headers)
    assert parse_security_header(joined) == parse_security_header(headers)
    assert all(o.alg and o.ealg and o.prot and o.mod for o in parse_security_header(headers))
