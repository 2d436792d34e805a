"""
SPEC §5.1 pinned at the edges: for every non-public range, its first and
last address are non-public and the addresses just outside it are public
(unless they start another listed range); every IPv6 form that embeds IPv4
is judged exactly like the IPv4 address it carries, edges included.
"""

from __future__ import annotations

import ipaddress
from typing import List, Optional, Tuple

import pytest

from codex_proxy.addresses import is_public

# (SPEC range, the address just before it, the address just after it);
# None where there is no such address or it belongs to another listed range.
V4_RANGES: List[Tuple[str, Optional[str], Optional[str]]] = [
    ("0.0.0.0/8", None, "1.0.0.0"),
    ("10.0.0.0/8", "9.255.255.255", "11.0.0.0"),
    ("100.64.0.0/10", "100.63.255.255", "100.128.0.0"),
    ("127.0.0.0/8", "126.255.255.255", "128.0.0.0"),
    ("169.254.0.0/16", "169.253.255.255", "169.255.0.0"),
    ("172.16.0.0/12", "172.15.255.255", "172.32.0.0"),
    ("192.0.0.0/24", "191.255.255.255", "192.0.1.0"),
    ("192.0.2.0/24", "192.0.1.255", "192.0.3.0"),
    ("192.88.99.0/24", "192.88.98.255", "192.88.100.0"),
    ("192.168.0.0/16", "192.167.255.255", "192.169.0.0"),
    ("198.18.0.0/15", "198.17.255.255", "198.20.0.0"),
    ("198.51.100.0/24", "198.51.99.255", "198.51.101.0"),
    ("203.0.113.0/24", "203.0.112.255", "203.0.114.0"),
    ("224.0.0.0/4", "223.255.255.255", None),  # 240/4 follows
    ("240.0.0.0/4", None, None),  # after 224/4, up to the end of IPv4
    ("255.255.255.255/32", None, None),  # inside 240/4
]

V6_RANGES: List[Tuple[str, Optional[str], Optional[str]]] = [
    ("::/128", None, None),  # ::1 follows
    ("::1/128", None, None),  # :: before, ::2 (compatible 0.0.0.2) after
    ("fc00::/7", "fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fe00::"),
    ("fe80::/10", "fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),  # fec0::/10 follows
    ("fec0::/10", None, None),  # between fe80::/10 and ff00::/8
    ("ff00::/8", None, None),  # up to the end of IPv6
    ("2001:db8::/32", "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db9::"),
]

# Prefixes that embed IPv4, and the addresses just outside each (public).
EMBEDDING_PREFIXES: List[Tuple[str, str, str]] = [
    ("::ffff:0:0/96", "::fffe:ffff:ffff", "::1:0:0:0"),
    ("::/96", "::", "::1:0:0"),  # '::' itself is listed: pinned in V6_RANGES
    ("64:ff9b::/96", "64:ff9a:ffff:ffff:ffff:ffff:ffff:ffff", "64:ff9b::1:0:0"),
    ("2002::/16", "2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "2003::"),
    ("2001::/32", "2000:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "2001:1::"),
]

PUBLIC_V4 = "1.1.1.1"


def _edges(ranges):
    for net, before, after in ranges:
        network = ipaddress.ip_network(net)
        yield pytest.param(net, network[0], network[-1], before, after, id=net)


@pytest.mark.parametrize("net, first, last, before, after", [*_edges(V4_RANGES), *_edges(V6_RANGES)])
def test_range_edges(net, first, last, before, after):
    assert not is_public(first), f"first address of {net}"
    assert not is_public(last), f"last address of {net}"
    if before is not None:
        assert ipaddress.ip_address(before) == first - 1
        assert is_public(ipaddress.ip_address(before)), f"just before {net}"
    if after is not None:
        assert ipaddress.ip_address(after) == last + 1
        assert is_public(ipaddress.ip_address(after)), f"just after {net}"


def _v4_edge_addresses() -> List[ipaddress.IPv4Address]:
    found = []
    for net, before, after in V4_RANGES:
        network = ipaddress.IPv4Network(net)
        found += [network[0], network[-1]]
        found += [ipaddress.IPv4Address(a) for a in (before, after) if a is not None]
    return found


def _forms(v4: ipaddress.IPv4Address) -> List[Tuple[str, ipaddress.IPv6Address]]:
    """
    Every IPv6 form carrying C{v4}; Teredo carries it once as the server
    and once as the (obfuscated) client, with a public address at the other end.
    """
    n = int(v4)
    public = int(ipaddress.IPv4Address(PUBLIC_V4))
    teredo = 0x2001_0000 << 96
    return [
        ("mapped", ipaddress.IPv6Address((0xFFFF << 32) | n)),
        ("nat64", ipaddress.IPv6Address((0x0064_FF9B << 96) | n)),
        ("6to4", ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1)),
        ("teredo-server", ipaddress.IPv6Address(teredo | (n << 64) | (public ^ 0xFFFFFFFF))),
        ("teredo-client", ipaddress.IPv6Address(teredo | (public << 64) | (n ^ 0xFFFFFFFF))),
        # Compatible ::a.b.c.d overlaps '::' and '::1' for 0.0.0.0 and 0.0.0.1.
        ("compatible", ipaddress.IPv6Address(n)),
    ]


@pytest.mark.parametrize("v4", _v4_edge_addresses(), ids=str)
def test_embedded_ipv4_is_judged_like_the_ipv4_address(v4):
    expected = is_public(v4)
    for form, v6 in _forms(v4):
        if form == "compatible" and int(v4) <= 1:
            expected_here = False  # '::' and '::1' are listed themselves
        else:
            expected_here = expected
        assert is_public(v6) is expected_here, f"{form} {v6} carrying {v4}"


@pytest.mark.parametrize("prefix, before, after", EMBEDDING_PREFIXES, ids=[p[0] for p in EMBEDDING_PREFIXES])
def test_embedding_prefix_edges(prefix, before, after):
    network = ipaddress.IPv6Network(prefix)
    before_ip, after_ip = ipaddress.ip_address(before), ipaddress.ip_address(after)
    assert after_ip == network[-1] + 1
    assert is_public(after_ip), f"just after {prefix}"
    if prefix != "::/96":
        assert before_ip == network[0] - 1
        assert is_public(before_ip), f"just before {prefix}"
    # The first and last address of the prefix carry 0.0.0.0 and
    # 255.255.255.255 (Teredo: a 0.0.0.0 server), both non-public.
    assert not is_public(network[0]) and not is_public(network[-1])
