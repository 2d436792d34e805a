"""
IP literal parsing and public/non-public classification (SPEC §5.1).

Pure: no I/O, no resolution. The policy core asks two questions here: "is
this host text an IP address?" (answered the way C's C{inet_aton} would, so
C{2130706433} is judged exactly like C{127.0.0.1}) and "may the proxy dial
this address when local binding is off?".
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Iterable, Iterator, Optional, Tuple, Union

import attrs

from codex_proxy.model import IPAddress

# One part of an inet_aton address: what strtoul(..., 0) consumes whole.
_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")

_V4_NON_PUBLIC = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
    )
)

_V6_NON_PUBLIC = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
        "2001:db8::/32",
        # RFC 8215 local-use NAT64 prefix: translated by a local gateway.
        "64:ff9b:1::/48",
    )
)

# Prefixes whose low 32 bits are an IPv4 address.
_V6_LOW32_EMBEDDING = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::ffff:0:0/96",  # IPv4-mapped
        "::/96",  # IPv4-compatible
        "64:ff9b::/96",  # NAT64 well-known prefix
    )
)
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")

_MASK32 = 0xFFFFFFFF

#: Every character an inet_aton spelling can contain (text is lower-case).
_INET_ATON_CHARS = re.compile(r"[0-9a-fx.]+")


@functools.lru_cache(maxsize=4096)
def parse_ip_literal(text: str) -> Optional[IPAddress]:
    """
    The IP address C{text} spells, or C{None} when it is not one.

    C{text} is lower-case, trimmed, without brackets or port. IPv4 is read
    with the rules of C's C{inet_aton} (1 to 4 parts, decimal, octal or
    hex); IPv6 zone ids (C{%eth0}) are refused because the policy cannot
    judge an interface-scoped destination. Cached: every request asks, and
    the answer for a string never changes.
    """
    if ":" in text:
        if "%" in text:
            return None
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    if _INET_ATON_CHARS.fullmatch(text) is None:
        return None  # a hostname: the common case, decided in one scan
    return _inet_aton(text)


def _inet_aton(text: str) -> Optional[ipaddress.IPv4Address]:
    """
    C{inet_aton}: every part but the last is one byte, the last part fills
    the bytes that remain (so C{127.1} is C{127.0.0.1}).
    """
    parts = text.split(".")
    if len(parts) > 4:
        return None
    values = []
    for part in parts:
        if _INET_ATON_PART.fullmatch(part) is None:
            return None
        values.append(_part_value(part))
    *leading, last = values
    if any(value > 0xFF for value in leading):
        return None
    remaining_bits = 8 * (4 - len(leading))
    if last >= 1 << remaining_bits:
        return None
    number = last
    for index, value in enumerate(leading):
        number |= value << (24 - 8 * index)
    return ipaddress.IPv4Address(number)


def _part_value(part: str) -> int:
    """
    The number one inet_aton part spells: C{0x} hex, leading C{0} octal.
    """
    if part[:2] in ("0x", "0X"):
        return int(part, 16)
    if part.startswith("0"):
        return int(part, 8)
    return int(part)


def ip_text(ip: IPAddress) -> str:
    """
    The canonical text of C{ip}: dotted quad, or RFC 5952 compressed IPv6
    in hex even for IPv4-mapped addresses (C{::ffff:7f00:1}), the same on
    every Python version.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    hextets = ["%x" % int(group, 16) for group in ip.exploded.split(":")]
    best_start, best_length = -1, 1
    start = None
    for index, group in enumerate(hextets + ["end"]):
        if group == "0":
            if start is None:
                start = index
        elif start is not None:
            if index - start > best_length:
                best_start, best_length = start, index - start
            start = None
    if best_start < 0:
        return ":".join(hextets)
    head = ":".join(hextets[:best_start])
    tail = ":".join(hextets[best_start + best_length :])
    return head + "::" + tail


def is_public(ip: IPAddress) -> bool:
    """
    Whether C{ip} is a public destination, i.e. outside every range SPEC
    §5.1 calls non-public. An IPv6 address embedding an IPv4 address is
    public only when every IPv4 address it embeds is.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return not any(ip in net for net in _V4_NON_PUBLIC)
    if any(ip in net for net in _V6_NON_PUBLIC):
        return False
    return all(is_public(embedded) for embedded in _embedded_ipv4(ip))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> Iterator[ipaddress.IPv4Address]:
    """
    The IPv4 addresses an IPv6 transition form carries (mapped, compatible,
    NAT64, 6to4, and both the server and the client of Teredo).
    """
    value = int(ip)
    if any(ip in net for net in _V6_LOW32_EMBEDDING):
        yield ipaddress.IPv4Address(value & _MASK32)
    elif ip in _SIX_TO_FOUR:
        yield ipaddress.IPv4Address((value >> 80) & _MASK32)
    elif ip in _TEREDO:
        yield ipaddress.IPv4Address((value >> 64) & _MASK32)
        yield ipaddress.IPv4Address((value & _MASK32) ^ _MASK32)


def is_local_name(host: str) -> bool:
    """
    Whether the normalised C{host} is C{localhost} or a name under it
    (RFC 6761 reserves C{*.localhost} for loopback).
    """
    return host == "localhost" or host.endswith(".localhost")


IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: What no range wider than one address unlocks (SPEC §5.3): loopback,
#: 0.0.0.0/8 and the cloud metadata addresses.
_V4_PROTECTED = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("169.254.169.254/32"),
)
_V6_PROTECTED = frozenset(
    ipaddress.IPv6Address(text) for text in ("::", "::1", "fd00:ec2::254")
)


def parse_range(text: str) -> IPNetwork:
    """
    The network a C{allowed_ranges}/C{denied_ranges} entry names: a CIDR,
    or a bare address standing for itself (/32, /128).

    @raise ValueError: not a CIDR, a bad prefix, or host bits set; the
        message says which.
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"invalid address range {text!r}: {e}") from None


def is_protected(ip: IPAddress) -> bool:
    """
    Whether C{ip} is loopback, in 0.0.0.0/8, unspecified or a metadata
    address, in any IPv6 form that embeds such an IPv4 address as well:
    only a range naming exactly that address unlocks it (SPEC §5.3).
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return any(ip in net for net in _V4_PROTECTED)
    return ip in _V6_PROTECTED or any(is_protected(v4) for v4 in _embedded_ipv4(ip))


@attrs.frozen
class AddressRanges:
    """
    The C{allowed_ranges} and C{denied_ranges} of a policy (SPEC §5.3),
    applied to every address the proxy would dial.
    """

    allowed: Tuple[IPNetwork, ...] = ()
    denied: Tuple[IPNetwork, ...] = ()

    @classmethod
    def build(cls, allowed: Iterable[str] = (), denied: Iterable[str] = ()) -> AddressRanges:
        """
        Parse range texts (see L{parse_range}).

        @raise ValueError: an entry is not a valid range.
        """
        return cls(
            tuple(parse_range(text) for text in allowed),
            tuple(parse_range(text) for text in denied),
        )

    def denying(self, ip: IPAddress) -> Optional[IPNetwork]:
        """
        The denied range holding C{ip}, or holding the IPv4 address an IPv6
        form of C{ip} embeds (a connection there reaches it), if any.
        """
        if not self.denied:
            return None
        forms = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            forms.extend(_embedded_ipv4(ip))
        for net in self.denied:
            if any(form in net for form in forms):
                return net
        return None

    def admits(self, ip: IPAddress) -> bool:
        """
        Whether an allowed range holds C{ip} (an IPv4-mapped address as its
        IPv4 address), so that it is not refused as non-public; a protected
        address (L{is_protected}) only by a range of that one address.
        """
        if not self.allowed:
            return False
        mapped = getattr(ip, "ipv4_mapped", None) or ip
        protected = is_protected(ip)
        return any(
            mapped in net and not (protected and net.num_addresses > 1)
            for net in self.allowed
        )
