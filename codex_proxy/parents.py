"""
Which parent proxy, if any, a target is reached through (SPEC §7).

Pure: the proxy's own environment is read once at start into a
L{ParentProxies} value, and L{ParentProxies.parent_for} answers per target.
C{HTTPS_PROXY} then C{ALL_PROXY} serve CONNECT targets, C{HTTP_PROXY} then
C{ALL_PROXY} plain ones, upper case before lower case; only C{http://} and
C{https://} parents are used. C{NO_PROXY} sends matching targets direct.
Credentials in a parent URL become a C{Proxy-Authorization} value that no
C{repr} and no warning ever shows.
"""

from __future__ import annotations

import base64
import ipaddress
import urllib.parse
from typing import Mapping, Optional, Tuple, Union

import attrs

from codex_proxy.addresses import authority, parse_ip_literal
from codex_proxy.config import ProxyConfig
from codex_proxy.domains import InvalidHost, normalize_host

_DEFAULT_PORTS = {"http": 80, "https": 443}

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@attrs.frozen
class ParentProxy:
    """
    One upstream proxy.

    @ivar scheme: C{"http"} or C{"https"} (TLS to the parent itself).
    @ivar host: the parent's normalised host (a name or an IP literal).
    @ivar authorization: the C{Proxy-Authorization} value, or C{None};
        left out of C{repr} so it is never logged.
    """

    scheme: str
    host: str
    port: int
    authorization: Optional[bytes] = attrs.field(default=None, repr=False)

    @property
    def address(self) -> str:
        """
        C{host:port} for messages (never with credentials).
        """
        return authority(self.host, self.port)


@attrs.frozen
class NoProxy:
    """
    A parsed C{NO_PROXY}: C{*}, host names (matching themselves and their
    subdomains, a leading dot optional), IP literals and CIDR blocks, each
    optionally with a C{:port}.
    """

    everything: bool = False
    names: Tuple[Tuple[str, Optional[int]], ...] = ()
    networks: Tuple[Tuple[_Network, Optional[int]], ...] = ()

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        names = []
        networks = []
        for raw in text.replace(" ", ",").split(","):
            entry = raw.strip()
            if not entry:
                continue
            if entry == "*":
                return cls(everything=True)
            entry, port = _split_port(entry)
            try:
                networks.append((ipaddress.ip_network(entry.strip("[]"), strict=False), port))
                continue
            except ValueError:
                pass
            try:
                name = normalize_host(entry.lstrip("*").lstrip("."))
            except InvalidHost:
                continue  # Unusable entries match nothing, as in curl.
            ip = parse_ip_literal(name)
            if ip is not None:
                networks.append((ipaddress.ip_network(ip), port))
            else:
                names.append((name, port))
        return cls(names=tuple(names), networks=tuple(networks))

    def matches(self, host: str, port: int) -> bool:
        """
        Whether the normalised C{host} on C{port} is to be reached direct.
        """
        if self.everything:
            return True
        ip = parse_ip_literal(host)
        if ip is not None:
            return any(
                ip in network and (want is None or want == port)
                for network, want in self.networks
            )
        return any(
            (host == name or host.endswith("." + name)) and (want is None or want == port)
            for name, want in self.names
        )


def _split_port(entry: str) -> Tuple[str, Optional[int]]:
    """
    Split a trailing C{:port} off a C{NO_PROXY} entry (not off a bare IPv6
    address or a CIDR block).
    """
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


@attrs.frozen
class ParentProxies:
    """
    The parents chosen from one environment.

    @ivar http: the parent for plain C{http://} targets.
    @ivar https: the parent for CONNECT (and TLS) targets.
    @ivar warnings: one line per ignored variable, without its value.
    """

    http: Optional[ParentProxy] = None
    https: Optional[ParentProxy] = None
    no_proxy: NoProxy = NoProxy()
    warnings: Tuple[str, ...] = ()

    def parent_for(self, host: str, port: int, tunnel: bool) -> Optional[ParentProxy]:
        """
        The parent for the normalised C{host} on C{port}, or C{None} to go
        direct. C{tunnel}: the target is a CONNECT (or TLS) target.
        """
        parent = self.https if tunnel else self.http
        if parent is None or self.no_proxy.matches(host, port):
            return None
        return parent


def _lookup(environ: Mapping[str, str], name: str) -> Tuple[Optional[str], Optional[str]]:
    """
    The first non-empty of C{NAME} and C{name}, with the variable it came from.
    """
    for key in (name.upper(), name.lower()):
        value = environ.get(key, "").strip()
        if value:
            return key, value
    return None, None


def parse_parent(value: str) -> ParentProxy:
    """
    Parse a parent proxy URL (C{http://user:pass@host:port}); a URL without
    a scheme is taken as C{http://}, like curl does.

    @raise ValueError: the URL is not usable; the message never contains it.
    """
    if "://" not in value:
        value = "http://" + value
    url = urllib.parse.urlsplit(value)
    scheme = url.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"unsupported scheme {scheme!r} (only http and https)")
    try:
        port = url.port or _DEFAULT_PORTS[scheme]
        host = normalize_host(url.hostname or "")
    except (ValueError, InvalidHost):
        raise ValueError("malformed host or port")
    authorization = None
    if url.username is not None:
        user = urllib.parse.unquote(url.username)
        password = urllib.parse.unquote(url.password or "")
        token = base64.b64encode(f"{user}:{password}".encode("utf-8"))
        authorization = b"Basic " + token
    return ParentProxy(scheme, host, port, authorization)


def from_environ(environ: Mapping[str, str]) -> ParentProxies:
    """
    Choose the parents from the proxy's own environment (SPEC §7).
    """
    warnings = []
    parents = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        key, value = _lookup(environ, name)
        if value is None:
            continue
        try:
            parents[name] = parse_parent(value)
        except ValueError as e:
            warnings.append(f"ignoring {key} as upstream proxy: {e}")
    _, no_proxy = _lookup(environ, "NO_PROXY")
    return ParentProxies(
        http=parents.get("HTTP_PROXY") or parents.get("ALL_PROXY"),
        https=parents.get("HTTPS_PROXY") or parents.get("ALL_PROXY"),
        no_proxy=NoProxy.parse(no_proxy or ""),
        warnings=tuple(warnings),
    )


def parents_from_config(
    config: ProxyConfig, environ: Mapping[str, str]
) -> Optional[ParentProxies]:
    """
    The parent proxies of the proxy's own environment, read once at start,
    or C{None} when C{allow_upstream_proxy} is off (SPEC §7).
    """
    return from_environ(environ) if config.allow_upstream_proxy else None
