"""The one IP parser (scope dropped, v4-mapped folded) and the one host:port syntax."""

from __future__ import annotations

import ipaddress

import pytest

from qmqpd.address import parse_ip, split_host_port


def test_parse_ip_folds_v4_mapped_and_drops_the_scope() -> None:
    assert parse_ip("::ffff:192.0.2.7") == ipaddress.IPv4Address("192.0.2.7")
    assert parse_ip("::FFFF:10.1.2.3") == ipaddress.IPv4Address("10.1.2.3")
    assert parse_ip("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")
    assert parse_ip("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert parse_ip("192.0.2.1") == ipaddress.IPv4Address("192.0.2.1")
    assert parse_ip("not an ip") is None
    assert parse_ip("") is None


@pytest.mark.parametrize(("text", "default", "expected"), [
    ("192.0.2.1:3310", None, ("192.0.2.1", 3310)),
    ("[::1]:9628", None, ("::1", 9628)),
    ("clamd.example:3310", None, ("clamd.example", 3310)),
    ("192.0.2.1", 53, ("192.0.2.1", 53)),
    ("::1", 53, ("::1", 53)),
    ("[::1]", 53, ("::1", 53)),
    ("[2001:db8::5]:5353", 53, ("2001:db8::5", 5353)),
    ("10.0.0.1:5353", 53, ("10.0.0.1", 5353)),
])
def test_host_port_forms(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert split_host_port(text, default) == expected


@pytest.mark.parametrize(("text", "default"), [
    ("192.0.2.1", None), ("::1", None), ("[::1]", None),  # no port and no default
    ("", 53), (":53", 53), ("host:", 53), ("host:0", 53), ("host:65536", 53),
    ("host:http", 53), ("host:-1", 53), ("host:٣", 53),  # non-ASCII digit
    ("[::1", 53), ("[::1]x", 53), ("[::1]:", 53), ("[mx.example]:25", 53),
    ("[192.0.2.1]:25", 53), ("2001:db8:::1", 53), ("1.2.3.4:628:1", 53),
])
def test_bad_host_port_forms(text: str, default: int | None) -> None:
    with pytest.raises(ValueError):
        split_host_port(text, default)
