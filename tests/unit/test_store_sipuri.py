"""ipsec.sipuri: where a URI points, as the store's look-ups read it."""
from __future__ import annotations

import pytest

from ipsec.sipuri import Address, SipUriError, alias_target, parse_uri, uri_target


@pytest.mark.parametrize("uri, target", [
    ("sip:alice@10.0.0.1", ("10.0.0.1", 5060, "udp")),
    ("sip:alice@10.0.0.1:6200", ("10.0.0.1", 6200, "udp")),
    ("SIP:10.0.0.1:6200;transport=TCP;lr", ("10.0.0.1", 6200, "tcp")),
    ("sips:alice@pcscf.EXAMPLE", ("pcscf.example", 5061, "tls")),
    ("sip:alice@10.0.0.1;transport=tls", ("10.0.0.1", 5061, "tls")),
    ("sip:alice@[2001:DB8:0::1]:6200", ("2001:db8::1", 6200, "udp")),
    ("sip:alice@[2001:db8::1]", ("2001:db8::1", 5060, "udp")),
    ('"Alice" <sip:alice@10.0.0.1:6200;transport=udp>;expires=600', ("10.0.0.1", 6200, "udp")),
    ("sip:alice:secret@10.0.0.1:6200?subject=x", ("10.0.0.1", 6200, "udp")),
])
def test_uri_target(uri, target):
    assert uri_target(parse_uri(uri)) == Address(*target)


@pytest.mark.parametrize("uri, alias", [
    ("sip:a@10.1.1.1:6200;alias=203.0.113.7~40000~1", ("203.0.113.7", 40000, "udp")),
    ("sip:a@10.1.1.1;ALIAS=203.0.113.7~5060~2;lr", ("203.0.113.7", 5060, "tcp")),
    ("sip:a@10.1.1.1;alias=[2001:db8::7]~5061~3", ("2001:db8::7", 5061, "tls")),
    ("sip:a@10.1.1.1;alias=2001:db8::7~5062~4", ("2001:db8::7", 5062, "sctp")),
])
def test_alias_target(uri, alias):
    assert alias_target(parse_uri(uri)) == Address(*alias)


def test_no_alias():
    assert alias_target(parse_uri("sip:a@10.1.1.1:6200;lr")) is None


@pytest.mark.parametrize("uri", [
    "tel:+123", "alice@10.0.0.1", "sip:", "sip:alice@", "sip:alice@10.0.0.1:0",
    "sip:alice@10.0.0.1:70000", "sip:alice@10.0.0.1:x", "sip:alice@[2001:db8::1",
    "sip:alice@[2001:db8::1]x", "sip:a@b;transport=carrier-pigeon",
    "sip:a@b;alias=1.2.3.4~5060", "sip:a@b;alias=1.2.3.4~5060~9", "sip:a@b;alias=1.2.3.4~0~1",
])
def test_unreadable_uris_are_the_senders_fault(uri):
    with pytest.raises(SipUriError):
        parsed = parse_uri(uri)
        uri_target(parsed)
        alias_target(parsed)


def test_sip_uri_error_is_a_value_error():
    assert issubclass(SipUriError, ValueError)
