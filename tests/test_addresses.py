"""
Tests for L{codex_proxy.addresses}: IP literal parsing and SPEC §5.1
classification.
"""

import ipaddress

import pytest

from codex_proxy.addresses import ip_text, is_local_name, is_public, parse_ip_literal

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "2130706433",
        "017700000001",
        "0x7f000001",
        "0x7f.1",
        "127.1",
        "127.0.1",
        "0177.0.0.01",
        "0x7f.0x0.0x0.0x1",
        "127.0.0x1",
    ],
)
def test_inet_aton_spellings_of_loopback(text):
    assert parse_ip_literal(text) == LOOPBACK


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
        ("10.16777215", "10.255.255.255"),
        ("10.1.65535", "10.1.255.255"),
        ("1.2.3.4", "1.2.3.4"),
        ("00", "0.0.0.0"),
    ],
)
def test_inet_aton_last_part_fills_remaining_bytes(text, expected):
    assert parse_ip_literal(text) == ipaddress.IPv4Address(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "example.com",
        "0x",
        "0x.1",
        "08",
        "019.0.0.1",
        "0xg",
        "1.2.3.4.5",
        "1..2",
        "1.2.3.",
        ".1.2.3",
        "256.1",
        "1.256.1.1",
        "1.2.3.256",
        "1.2.65536",
        "1.16777216",
        "4294967296",
        "-1",
        "+1",
        " 1",
        "1 ",
        "fe80::1%eth0",
        "::1::",
        "1:2",
        "::ffff:127.0.0.01",
    ],
)
def test_not_ip_literals(text):
    assert parse_ip_literal(text) is None


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("::1", "::1"),
        ("0:0::1", "::1"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),
        ("1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"),
    ],
)
def test_ipv6_canonical_text(text, canonical):
    assert ip_text(parse_ip_literal(text)) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "100.64.0.1",
        "100.127.255.255",
        "127.0.0.1",
        "127.255.255.254",
        "169.254.169.254",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "192.88.99.1",
        "192.168.1.1",
        "198.18.0.1",
        "198.19.255.255",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "febf::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "64:ff9b:1::808:808",
    ],
)
def test_non_public(text):
    assert not is_public(parse_ip_literal(text))


@pytest.mark.parametrize(
    "text",
    [
        "8.8.8.8",
        "1.1.1.1",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.1",
        "192.169.0.1",
        "198.20.0.1",
        "223.255.255.255",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public(text):
    assert is_public(parse_ip_literal(text))


def _teredo(server: str, client: str) -> ipaddress.IPv6Address:
    """
    A Teredo address for C{server} and (obfuscated) C{client}.
    """
    value = (0x2001_0000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    obfuscated = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return ipaddress.IPv6Address(value | obfuscated)


@pytest.mark.parametrize(
    "address",
    [
        ipaddress.IPv6Address("::ffff:127.0.0.1"),
        ipaddress.IPv6Address("::ffff:10.1.2.3"),
        ipaddress.IPv6Address("::ffff:169.254.169.254"),
        ipaddress.IPv6Address("::127.0.0.1"),
        ipaddress.IPv6Address("::192.168.0.1"),
        ipaddress.IPv6Address("64:ff9b::127.0.0.1"),
        ipaddress.IPv6Address("64:ff9b::10.0.0.1"),
        ipaddress.IPv6Address("2002:7f00:1::"),
        ipaddress.IPv6Address("2002:c0a8:101:1::1"),
        _teredo("8.8.8.8", "127.0.0.1"),
        _teredo("8.8.8.8", "192.168.1.1"),
        _teredo("10.0.0.1", "8.8.8.8"),
    ],
)
def test_ipv6_embedding_non_public_ipv4_is_non_public(address):
    assert not is_public(address)


def test_teredo_with_public_ends_is_public():
    assert is_public(_teredo("8.8.8.8", "1.1.1.1"))


@pytest.mark.parametrize(
    "host, local",
    [
        ("localhost", True),
        ("a.localhost", True),
        ("a.b.localhost", True),
        ("localhost.example", False),
        ("notlocalhost", False),
        ("example.com", False),
    ],
)
def test_is_local_name(host, local):
    assert is_local_name(host) is local
