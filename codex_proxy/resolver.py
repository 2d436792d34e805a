"""
Name resolution: L{resolve}, the one lookup of a name the policy service
makes (with a timeout, answers collected into IP addresses), and fixed
answers for chosen names (C{--resolve}).

L{TableResolver} answers the names of its table itself and hands every other
name to the resolver it wraps (the reactor's, which runs C{getaddrinfo} off
the reactor thread). Its answers are vetted like any DNS answer (SPEC §5.1):
a name pinned to a private address is refused unless local binding is on.
This lets an operator pin a name, and lets tests give a real process the
answers an attacker's DNS would (SPEC §5.2: "tests map names to chosen
addresses").
"""

from __future__ import annotations

import ipaddress
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type

from twisted.internet import defer
from twisted.internet._resolver import HostResolution
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy.addresses import parse_ip_literal
from codex_proxy.domains import InvalidHost, normalize_host
from codex_proxy.errors import ProxyError, UpstreamError
from codex_proxy.model import IPAddress, Reason


class ResolveEntryError(ProxyError, ValueError):
    """
    A C{NAME=ADDR[,ADDR...]} entry that cannot be used; the message quotes it.
    """


def parse_resolve_entry(text: str) -> Tuple[str, Tuple[IPAddress, ...]]:
    """
    Parse one C{--resolve NAME=ADDR[,ADDR...]}: the normalised name and its
    addresses, in order. NAME must be a hostname (an IP literal is never
    resolved); each ADDR a plain IPv4 dotted quad or IPv6 address, brackets
    allowed.

    @raise ResolveEntryError: the entry is malformed.
    """
    raw_name, equals, raw_addresses = text.partition("=")
    if not equals or not raw_name.strip() or not raw_addresses.strip():
        raise ResolveEntryError(f"expected NAME=ADDR[,ADDR...], got {text!r}")
    try:
        name = normalize_host(raw_name)
    except InvalidHost as e:
        raise ResolveEntryError(f"invalid name in {text!r}: {e}") from None
    if parse_ip_literal(name) is not None:
        raise ResolveEntryError(f"{raw_name.strip()!r} in {text!r} is an IP address, not a name")
    found = []
    for part in raw_addresses.split(","):
        spelled = part.strip()
        if spelled.startswith("[") and spelled.endswith("]"):
            spelled = spelled[1:-1]
        try:
            found.append(ipaddress.ip_address(spelled))
        except ValueError:
            raise ResolveEntryError(
                f"{part.strip()!r} in {text!r} is not an IP address"
            ) from None
    return name, tuple(dict.fromkeys(found))


@implementer(IHostnameResolver)
class TableResolver:
    """
    Answers the names of C{table} (normalised names to addresses) itself,
    synchronously, and every other name through C{fallback}; without a
    fallback, other names resolve to nothing (a DNS failure).
    """

    def __init__(
        self,
        table: Mapping[str, Iterable[IPAddress]],
        fallback: Optional[IHostnameResolver] = None,
    ) -> None:
        self._table: Dict[str, Tuple[IPAddress, ...]] = {
            name: tuple(found) for name, found in table.items()
        }
        self._fallback = fallback

    def set(self, name: str, addresses: Iterable[IPAddress]) -> None:
        """
        Answer C{name} with C{addresses} from now on.
        """
        self._table[name] = tuple(addresses)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[Type[IAddress]]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        found = self._table.get(hostName)
        if found is None and self._fallback is not None:
            return self._fallback.resolveHostName(
                resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
            )
        resolution = HostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for ip in found or ():
            cls = IPv4Address if ip.version == 4 else IPv6Address
            resolutionReceiver.addressResolved(cls("TCP", str(ip), portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


def resolver_with(
    entries: Iterable[str], fallback: IHostnameResolver
) -> IHostnameResolver:
    """
    C{fallback} with the names of C{--resolve} C{entries} answered from a
    table (a later entry for the same name replaces an earlier one, as in
    curl); C{fallback} itself when there are none.

    @raise ResolveEntryError: an entry is malformed.
    """
    table = dict(parse_resolve_entry(entry) for entry in entries)
    if not table:
        return fallback
    return TableResolver(table, fallback)


@implementer(IResolutionReceiver)
class _Collector:
    """
    Gathers one resolution's answers into a Deferred list of IP addresses.
    """

    def __init__(self) -> None:
        self.deferred: defer.Deferred[List[IPAddress]] = defer.Deferred()
        self._found: List[IPAddress] = []

    def resolutionBegan(self, resolution: object) -> None:
        pass

    def addressResolved(self, address: object) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)):
            # getaddrinfo may append a zone to link-local answers.
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
            if ip not in self._found:
                self._found.append(ip)

    def resolutionComplete(self) -> None:
        if not self.deferred.called:
            self.deferred.callback(self._found)


def resolve(
    resolver: IHostnameResolver,
    clock: IReactorTime,
    name: str,
    port: int,
    timeout: float,
) -> defer.Deferred[List[IPAddress]]:
    """
    Resolve C{name} to its addresses, failing with L{UpstreamError} when there
    are none or the resolver does not answer within C{timeout} seconds.
    """
    collector = _Collector()
    resolver.resolveHostName(collector, name, port)
    d = collector.deferred
    d.addTimeout(timeout, clock)

    def check(found: List[IPAddress]) -> List[IPAddress]:
        if not found:
            raise UpstreamError(
                Reason.UPSTREAM_DNS_FAILED, f"{name} did not resolve to any address"
            )
        return found

    def timedOut(failure: Failure) -> List[IPAddress]:
        failure.trap(defer.TimeoutError)
        raise UpstreamError(
            Reason.UPSTREAM_DNS_FAILED, f"resolving {name} timed out after {timeout}s"
        )

    d.addCallbacks(check, timedOut)
    return d
