"""
The listeners of one proxy: the protocol factory of each listener an
effective config turns on, and binding them as endpoint services inside one
C{MultiService}, so that a listener that cannot be bound stops start-up with
a L{ListenError} naming its address and config key (SPEC §2.3).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple, Union, cast

import attrs
from twisted.application import internet, strports
from twisted.application.service import MultiService
from twisted.internet import defer, endpoints, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy.addresses import authority
from codex_proxy.admin import admin_site
from codex_proxy.ca import system_roots_file
from codex_proxy.config import ListenAddress, ProxyConfig, head_limits
from codex_proxy.configview import policy_document
from codex_proxy.connections import Connections
from codex_proxy.dnsserver import DNSFactory
from codex_proxy.errors import ProxyError
from codex_proxy.httpproxy import HTTPProxyFactory
from codex_proxy.metrics import Metrics
from codex_proxy.mitm import Interception, Interceptor, OriginTLS, UpstreamTrust, trust_files
from codex_proxy.parents import ParentProxies
from codex_proxy.policyservice import PolicyService
from codex_proxy.secrets import Secrets
from codex_proxy.socks5 import SOCKS5Factory
from codex_proxy.upstream import Upstream

_log = Logger()

#: The listen queue: a burst of connections (hundreds of clients starting
#: at once) waits in the kernel instead of retrying dropped SYNs a second
#: later, as it would with Twisted's default of 50.
LISTEN_BACKLOG = 1024


class ListenError(ProxyError):
    """
    A listener could not be bound; the message names the address and key.
    """


@attrs.frozen
class Listener:
    """
    One listener to bind: its name in the ports file, its config key, where
    and what; C{datagram}, if any, is bound for UDP on the same address and
    port as the stream listener (the DNS listener).
    """

    name: str
    key: str
    address: ListenAddress
    factory: IProtocolFactory
    datagram: Optional[Any] = None


def listeners(
    config: ProxyConfig,
    policy: PolicyService,
    reactor: Any,
    connections: Connections,
    parents: Optional[ParentProxies],
    interception: Optional[Interception],
    environ: Mapping[str, str],
    secrets: Optional[Secrets] = None,
    metrics: Optional[Metrics] = None,
    ready: Callable[[], bool] = lambda: False,
    current: Optional[Callable[[], ProxyConfig]] = None,
) -> List[Listener]:
    """
    The listeners of an enabled C{config} (none of a disabled one), sharing
    one upstream dialler and one connection registry.

    @param metrics: fed with connect times, and served by the operations
        listener (SPEC §13) when C{admin_url} is set.
    @param ready: whether the proxy's listeners are bound (C{/healthz}).
    @param current: the effective config in force (C{/policy}; default
        C{config}).
    """
    if not config.enabled:
        return []
    limits = config.limits
    upstream = Upstream(
        reactor,
        limits.connect_timeout_s,
        connections,
        parents=parents,
        observe=None if metrics is None else metrics.observe_connect,
    )
    interceptor = (
        None
        if interception is None
        else Interceptor(interception.ca, interception.trust, reactor.seconds)
    )
    http = HTTPProxyFactory(
        policy,
        upstream,
        reactor,
        head_limits(config),
        tunnel_idle=limits.tunnel_idle_s,
        header_timeout=limits.header_timeout_s,
        keepalive_idle=limits.keepalive_idle_s,
        response_timeout=limits.response_timeout_s,
        connections=connections,
        mitm=interceptor,
        origin_tls=interceptor or _origin_tls(environ),
        secrets=secrets,
    )
    found = [Listener("http", "proxy_url", config.http_listen, http)]
    if config.enable_socks5:
        socks = SOCKS5Factory(
            policy,
            upstream,
            reactor,
            limits,
            enable_udp=config.enable_socks5_udp,
            reactor=reactor,
            connections=connections,
            https=http if interceptor is not None else None,
        )
        found.append(Listener("socks", "socks_url", config.socks_listen, socks))
    if config.dns_listen is not None:
        dns = DNSFactory(policy, connections)
        found.append(Listener("dns", "dns_url", config.dns_listen, dns, dns.datagram()))
    if config.admin_listen is not None and metrics is not None:
        shown = current or (lambda: config)
        site = admin_site(
            metrics,
            ready=ready,
            blocked=policy.blocked_events,
            policy=lambda: policy_document(shown()),
            token=config.admin_token,
            reactor=reactor,
        )
        found.append(Listener("admin", "admin_url", config.admin_listen, site))
    return found


def _origin_tls(environ: Mapping[str, str]) -> Optional[OriginTLS]:
    """
    Client TLS for absolute-form C{https://} requests: the system roots
    plus C{SSL_CERT_FILE} (SPEC §7). A trust store that cannot be read
    leaves such requests failing with C{upstream-tls-failed}.
    """
    try:
        trust = UpstreamTrust.from_files(trust_files(environ, system_roots_file()))
    except ValueError as e:
        _log.warn("no trust store for https:// requests: {error}", error=str(e))
        return None
    return OriginTLS(trust)


def _description(address: ListenAddress) -> str:
    """
    The endpoint string of a listener (C{serverFromString} syntax).
    """
    kind = "tcp6" if ":" in address.host else "tcp"
    interface = endpoints.quoteStringArgument(address.host)
    return f"{kind}:port={address.port}:interface={interface}:backlog={LISTEN_BACKLOG}"


@implementer(IStreamServerEndpoint)
@attrs.frozen
class _NamedEndpoint:
    """
    An endpoint that hands its port to C{bound} once listening, and turns a
    failure to listen into a L{ListenError} naming the address and key.
    """

    endpoint: IStreamServerEndpoint
    address: ListenAddress
    key: str
    bound: Callable[[IListeningPort], None]

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return self.endpoint.listen(factory).addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.bound(port)
        return port

    def _failed(self, failure: Failure) -> NoReturn:
        raise ListenError(
            f"cannot listen on {self.address} ({self.key}): {failure.getErrorMessage()}"
        )


def bind(
    wanted: Sequence[Listener], reactor: Any
) -> Tuple[MultiService, Dict[str, IListeningPort]]:
    """
    Bind every listener now, in order: the running service that owns them
    (stopping it stops listening) and each bound port by listener name.

    @raise ListenError: a listener cannot be bound; the ones already bound
        are released.
    """
    service = MultiService()
    ports: Dict[str, IListeningPort] = {}
    for listener in wanted:
        child = strports.service(_description(listener.address), listener.factory, reactor)
        child.endpoint = _NamedEndpoint(
            child.endpoint,
            listener.address,
            listener.key,
            functools.partial(ports.__setitem__, listener.name),
        )
        child.setServiceParent(service)
    try:
        service.startService()
        for listener in wanted:
            if listener.datagram is not None:
                _bindDatagram(service, listener, ports[listener.name], reactor)
    except ListenError:
        # The listeners after the failed one were never started.
        for child in service:
            if child.running:
                child.stopService()
        raise
    return service, ports


def _bindDatagram(
    service: MultiService, listener: Listener, stream: IListeningPort, reactor: Any
) -> None:
    """
    Bind the UDP side of C{listener} on the address and port its stream side
    got (so port 0 gives one port number for both), as a child of the running
    C{service}.

    @raise ListenError: the UDP port cannot be bound.
    """
    host, number = bound_address(stream)
    udp = internet.UDPServer(number, listener.datagram, interface=host, reactor=reactor)
    try:
        udp.setServiceParent(service)
    except error.CannotListenError as e:
        raise ListenError(
            f"cannot listen on {listener.address} ({listener.key}) for UDP: {e}"
        ) from None


def bound_address(port: IListeningPort) -> Tuple[str, int]:
    """
    The host text and port number a TCP port is bound to.
    """
    address = cast(Union[IPv4Address, IPv6Address], port.getHost())
    return address.host, address.port


def address_text(port: IListeningPort) -> str:
    """
    C{host:port} of a bound port, IPv6 in brackets.
    """
    host, number = bound_address(port)
    return authority(host, number)
