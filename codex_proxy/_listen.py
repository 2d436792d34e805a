"""
Listener addresses of the network section (SPEC §2.2, §2.3): parsing
C{proxy_url}-style values, forcing listeners back to loopback, and the
listeners that are loopback only whatever the dangerous flags say.

Pure core, like L{codex_proxy.config}, which re-exports L{ListenAddress}
and L{parse_listen_address}.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional

import attrs

from codex_proxy._toml import Table, is_str
from codex_proxy.addresses import authority


@attrs.frozen
class ListenAddress:
    """
    Where a listener binds: an IP literal (IPv6 without brackets) and a port,
    0 meaning ephemeral.
    """

    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        """
        Only 127.0.0.0/8 and ::1 count: anything else is reachable from
        elsewhere (SPEC §2.3).
        """
        address = ipaddress.ip_address(self.host)
        if address.version == 4:
            return address in _LOOPBACK_V4
        return address == _LOOPBACK_V6

    def __str__(self) -> str:
        return authority(self.host, self.port)


_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.ip_address("::1")
_LISTEN_SCHEMES = frozenset({"http", "https", "socks5", "socks5h"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def parse_listen_address(text: str) -> ListenAddress:
    """
    Parse C{[scheme://]host:port[/]} where host is an IP literal (IPv6 in
    brackets) or C{localhost}; names are refused so a listener never depends
    on DNS.

    @raise ValueError: with a message saying what is wrong.
    """
    rest = text.strip()
    scheme = _SCHEME.match(rest)
    if scheme:
        if scheme.group(1).lower() not in _LISTEN_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme.group(1)!r} "
                "(expected http, https, socks5 or socks5h)"
            )
        rest = rest[scheme.end() :]
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    tail = rest[len(authority) :]
    if tail not in ("", "/"):
        raise ValueError(f"unexpected {tail!r} after host:port")
    if "@" in authority:
        raise ValueError("credentials are not allowed in a listener address")
    if authority.startswith("["):
        host, bracket, port = authority[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise ValueError("expected [IPv6]:port")
        port = port[1:]
        version = 6
    else:
        host, colon, port = authority.rpartition(":")
        if not colon:
            raise ValueError("a port is required (host:port)")
        if ":" in host:
            raise ValueError("an IPv6 address must be in brackets: [::1]:port")
        version = 4
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"invalid port {port!r} (expected 0..65535)")
    if version == 4 and host.lower() == "localhost":
        return ListenAddress("127.0.0.1", int(port))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"host {host!r} must be an IP address or 'localhost'"
        ) from None
    if address.version != version:
        raise ValueError("an IPv6 address must be in brackets: [::1]:port")
    return ListenAddress(str(address), int(port))


def clamp_listens(
    network: Table, listens: dict[str, ListenAddress], dangerous: bool, unix: bool
) -> tuple[dict[str, ListenAddress], tuple[str, ...]]:
    """
    Force non-loopback listeners back to 127.0.0.1 unless the user took the
    risk explicitly and no unix socket is exposed (SPEC §2.3).
    """
    clamped = dict(listens)
    warnings = []
    for name, address in listens.items():
        if address.is_loopback:
            continue
        where = f"{network.source}: {network.key(name)}"
        safe = ListenAddress("127.0.0.1", address.port)
        if unix:
            clamped[name] = safe
            warnings.append(
                f"{where}: non-loopback address {address} replaced by {safe} "
                "because unix sockets are allowed (allow_unix_sockets or "
                "dangerously_allow_all_unix_sockets)"
            )
        elif dangerous:
            warnings.append(
                f"{where}: DANGEROUS: listening on non-loopback address {address} "
                "(dangerously_allow_non_loopback_proxy = true); other machines "
                "can use this proxy"
            )
        else:
            clamped[name] = safe
            warnings.append(
                f"{where}: non-loopback address {address} replaced by {safe} "
                "(set dangerously_allow_non_loopback_proxy = true to keep it)"
            )
    return clamped, tuple(warnings)


def loopback_listen(
    network: Table, name: str, what: str, scheme: Optional[str] = None
) -> Optional[ListenAddress]:
    """
    The address of a listener that binds loopback only, whatever
    C{dangerously_allow_non_loopback_proxy} says, or C{None} when C{name}
    is unset: the DNS listener (SPEC §14.2; an open resolver answering for
    the allowlist is never wanted) and the operations listener (SPEC §13;
    it shows the policy and every recent block). With C{scheme}, a URL
    must use that one; without, any scheme is ignored.
    """
    text = network.get(name, None, is_str, "a string")
    if text is None:
        return None
    key = network.key(name)
    found = _SCHEME.match(text.strip())
    if found and scheme is not None and found.group(1).lower() != scheme:
        raise network.error(key, f"invalid listener address {text!r}: the scheme must be {scheme}")
    try:
        address = parse_listen_address(text.strip()[found.end() :] if found else text)
    except ValueError as e:
        raise network.error(key, f"invalid listener address {text!r}: {e}") from None
    if not address.is_loopback:
        raise network.error(
            key,
            f"{address} is not on loopback (the {what} is loopback only, whatever"
            " dangerously_allow_non_loopback_proxy says)",
        )
    return address
