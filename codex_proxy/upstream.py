"""
Outbound connections: the only place that dials out.

Callers hand over the vetted addresses of a L{Verdict}; this module never
sees a hostname of a destination, so nothing can resolve a name a second
time (SPEC §5.2). Addresses are tried in order until one connects.

A L{Route} says where the bytes go: direct to vetted addresses, to a unix
socket (SPEC §8), or through a parent proxy (SPEC §7): plain requests are
written to the parent in absolute-form by the caller, tunnels are chained
here with a C{CONNECT} to the parent. The parent is our own configuration,
so its name is resolved by the reactor and it is exempt from the local
protection that applies to destinations.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple, cast

import attrs
from twisted.internet import defer, endpoints, error, posixbase
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from codex_proxy import _httphead
from codex_proxy._dial import Connecting
from codex_proxy._httpfields import Headers
from codex_proxy._httptarget import serialize_request_head
from codex_proxy.addresses import authority
from codex_proxy.addresses import parse_ip_literal
from codex_proxy.parents import ParentProxies, ParentProxy
from codex_proxy.errors import ProtocolError, UpstreamError
from codex_proxy.connections import Connections
from codex_proxy.metrics import timed
from codex_proxy.model import IPAddress, PerVerdict, Reason, Verdict


class IProxyTransport(ITLSTransport, IConsumer, IPushProducer):
    """
    What the proxy uses of a connection's transport (TCP): half-close, TLS
    started on it, and flow control as consumer and as producer.
    """


class ISink(Interface):
    """
    Where an L{Outbound} connection reports once it is attached.
    """

    def outboundData(data: bytes) -> None:
        """
        The destination sent C{data}.
        """

    def outboundEOF() -> None:
        """
        The destination half-closed its side.
        """

    def outboundLost(reason: Failure) -> None:
        """
        The connection is gone.
        """


@implementer(IHalfCloseableProtocol)
class Outbound(Protocol):
    """
    A connection to a destination. Its events go to C{sink}, which the caller
    attaches when the dial's Deferred fires (before any byte can arrive);
    once detached, whatever still arrives (a TLS leg reads on until
    close_notify) goes nowhere.

    @ivar early: bytes a parent proxy sent right behind its answer to our
        C{CONNECT}: the first tunnel bytes, for the caller to relay.
    """

    transport: IProxyTransport
    sink: Optional[ISink] = None
    early = b""
    _handshake: Optional["_ParentConnect"] = None

    def __init__(self, connections: Connections, made: Optional[Callable[["Outbound"], None]] = None) -> None:
        self._connections = connections
        self._made = made

    def connectionMade(self) -> None:
        self._connections.opened(self.transport)
        if self._made is not None:
            self._made(self)

    def attach(self, sink: ISink) -> None:
        self.sink = sink

    def detach(self) -> None:
        """
        Stop reporting: nothing this connection still reads reaches anyone.
        """
        self.sink = None

    def dataReceived(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.outboundData(data)
        elif self._handshake is not None:
            # Before attach() only the parent's answer to CONNECT arrives.
            self._handshake.received(data)

    def readConnectionLost(self) -> None:
        if self.sink is not None:
            self.sink.outboundEOF()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connections.closed(self.transport)
        if self._handshake is not None:
            self._handshake.lost(reason)
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink.outboundLost(reason)


@attrs.frozen(cache_hash=True)
class Route:
    """
    Where a request's connection goes. Equal routes may share a kept-alive
    connection, so a plain route through a parent leaves the target out.
    Its hash is worked out once: it keys parked connections.

    @ivar addresses: direct: the vetted addresses, tried in order.
    @ivar port: direct: the destination port.
    @ivar parent: the parent proxy (SPEC §7), or C{None} for direct.
    @ivar target: through a parent, the C{host:port} to C{CONNECT} to;
        C{None} for plain requests, which go to the parent in absolute-form.
    @ivar unix: the unix socket path (SPEC §8).
    """

    addresses: Tuple[IPAddress, ...] = ()
    port: int = 0
    parent: Optional[ParentProxy] = None
    target: Optional[str] = None
    unix: Optional[str] = None

    @property
    def absolute_form(self) -> bool:
        """
        Plain requests on this route are written in absolute-form.
        """
        return self.parent is not None and self.target is None


class _ParentConnect:
    """
    Our C{CONNECT} to a parent proxy, on a connection to it: fires with the
    L{Outbound} once the parent answers 2xx, fails with L{UpstreamError}
    (carrying the parent's status) otherwise.
    """

    def __init__(self, out: Outbound, parent: ParentProxy, target: str) -> None:
        self._out = out
        self._parent = parent
        self._target = target
        self._parser = _httphead.ResponseHeadParser("CONNECT")
        self.deferred: defer.Deferred[Outbound] = defer.Deferred(self._cancel)
        headers: Headers = ((b"Host", target.encode("ascii")),)
        if parent.authorization is not None:
            headers += ((b"Proxy-Authorization", parent.authorization),)
        out._handshake = self
        out.transport.write(serialize_request_head("CONNECT", target, headers))

    def received(self, data: bytes) -> None:
        try:
            result = self._parser.feed(data)
        except ProtocolError as e:
            self._fail(None, f"the upstream proxy {self._parent.address} answered CONNECT badly: {e.message}")
            return
        if result is None:
            return
        head, rest = result
        if not 200 <= head.status < 300:
            self._fail(
                head.status,
                f"the upstream proxy {self._parent.address} refused CONNECT"
                f" {self._target} with {head.status}",
            )
            return
        self._out._handshake = None
        self._out.early = rest
        self.deferred.callback(self._out)

    def lost(self, reason: Failure) -> None:
        self._out._handshake = None
        if not self.deferred.called:
            self.deferred.errback(
                UpstreamError(
                    Reason.UPSTREAM_CONNECT_FAILED,
                    f"the upstream proxy {self._parent.address} closed the"
                    f" connection before answering CONNECT {self._target}",
                )
            )

    def _fail(self, status: Optional[int], message: str) -> None:
        self._out._handshake = None
        self._out.transport.abortConnection()
        if not self.deferred.called:
            self.deferred.errback(
                UpstreamError(Reason.UPSTREAM_CONNECT_FAILED, message, upstream_status=status)
            )

    def _cancel(self, _: object) -> None:
        self._out._handshake = None
        self._out.transport.abortConnection()


def _classify(failure: Failure, where: str) -> UpstreamError:
    if failure.check(error.ConnectionRefusedError):
        return UpstreamError(Reason.UPSTREAM_REFUSED, f"{where} refused the connection")
    if failure.check(error.TimeoutError, defer.TimeoutError):
        return UpstreamError(Reason.UPSTREAM_TIMEOUT, f"connecting to {where} timed out")
    return UpstreamError(
        Reason.UPSTREAM_CONNECT_FAILED,
        f"connecting to {where} failed: {failure.getErrorMessage()}",
    )


class _OutboundFactory(Factory):
    """
    Builds the L{Outbound} of each dial (quietly: a log line per connection
    would cost more than the dial).
    """

    noisy = False

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    def buildProtocol(
        self, addr: Optional[IAddress], made: Optional[Callable[[Outbound], None]] = None
    ) -> Outbound:
        return Outbound(self._connections, made)


class _TCPDial:
    """
    Dials an IP literal like a TCP client endpoint (C{connect(factory)}),
    connecting our L{Outbound} itself: on a posix reactor with
    L{codex_proxy._dial.Connecting}, on another with C{connectTCP}.
    Twisted's C{TCP4ClientEndpoint}/C{TCP6ClientEndpoint} put a
    wrapping protocol between the transport and ours, with its own
    Deferreds: measured with C{bench/cpu_per_request.py --only connect},
    dials through them cost the proxy about 20 CPU us more per tunnel.
    """

    def __init__(self, reactor: IReactorTCP, host: str, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout

    def __str__(self) -> str:
        return authority(self._host, self._port)

    def connect(self, factory: _OutboundFactory) -> defer.Deferred[Outbound]:
        if isinstance(self._reactor, posixbase.PosixReactorBase):
            build = functools.partial(factory.buildProtocol, None)
            return Connecting(self._reactor, self._host, self._port, self._timeout, build).deferred
        dialling = _Dialling(factory)
        deferred = dialling.deferred = defer.Deferred(dialling.cancel)
        dialling.connector = self._reactor.connectTCP(self._host, self._port, dialling, self._timeout)
        return deferred


class _Dialling(ClientFactory):
    """
    One dial of L{_TCPDial}: its Deferred fires with the L{Outbound} once
    connected, or fails with why it could not connect.

    Once it has fired, the dial holds neither it nor the connector, and a
    lost connection's connector lets go of its transport (which holds the
    connector): no reference cycle outlives a connection, for the garbage
    collector to find.
    """

    noisy = False
    deferred: Optional[defer.Deferred[Outbound]] = None
    connector: Any = None

    def __init__(self, outbound: _OutboundFactory) -> None:
        self._outbound = outbound

    def buildProtocol(self, addr: Optional[IAddress]) -> Outbound:
        return self._outbound.buildProtocol(addr, self._connected)

    def cancel(self, deferred: object) -> None:
        if self.connector is not None:
            self.connector.stopConnecting()

    def _settled(self) -> Optional[defer.Deferred[Outbound]]:
        deferred, self.deferred, self.connector = self.deferred, None, None
        return deferred

    def _connected(self, out: Outbound) -> None:
        deferred = self._settled()
        if deferred is not None:
            deferred.callback(out)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        deferred = self._settled()
        if deferred is not None:
            deferred.errback(reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        connector.transport = None


class IUpstream(Interface):
    """
    The upstream connector: how the listeners open every outbound
    connection (L{Upstream}; L{codex_proxy.testing.MemoryUpstream} in
    tests).
    """

    def route(verdict: Verdict, tunnel: bool) -> Route:
        """
        The route for an allowed C{verdict}; C{tunnel} for a CONNECT (or any
        TLS) target, which a parent proxy gets as a chained C{CONNECT}.
        """

    def dial(route: Route) -> defer.Deferred[Outbound]:
        """
        Connect along C{route}: fires with the attached-to-nothing
        L{Outbound}, or fails with L{UpstreamError}; cancelling stops it.
        """

    def connect(addresses: Sequence[IPAddress], port: int) -> defer.Deferred[Outbound]:
        """
        Connect directly to the first of C{addresses} that accepts.
        """


def route_for(verdict: Verdict, tunnel: bool, parents: Optional[ParentProxies]) -> Route:
    """
    The route for an allowed C{verdict} (see L{IUpstream.route}), through
    one of C{parents} when they name one for it.
    """
    request = verdict.request
    if request.unix_socket is not None:
        return Route(unix=request.unix_socket)
    parent = parents.parent_for(verdict.host, verdict.port, tunnel) if parents is not None else None
    if parent is None:
        return Route(addresses=verdict.addresses, port=verdict.port)
    if not tunnel:
        return Route(parent=parent)
    return Route(parent=parent, target=authority(verdict.host, verdict.port))


@implementer(IUpstream)
class Upstream:
    """
    Dials vetted addresses, unix sockets and parent proxies with a connect
    timeout.

    @param parents: the parent proxies read from the environment at start,
        or C{None} when C{allow_upstream_proxy} is off.
    @param parent_tls: makes the client TLS options for an C{https://}
        parent from its host name (default: the platform trust store,
        which honours C{SSL_CERT_FILE}, with host name checking).
    @param observe: given the seconds each outbound connection took to
        connect or fail (the connect latency histogram), when metrics are
        kept.

    @ivar connections: where outbound connections register while open.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        connect_timeout: float = 10.0,
        connections: Optional[Connections] = None,
        parents: Optional[ParentProxies] = None,
        parent_tls: Callable[[str], Any] = optionsForClientTLS,
        observe: Optional[Callable[[float], None]] = None,
    ) -> None:
        self._reactor = reactor
        self._observe = observe
        self._timeout = connect_timeout
        self.connections = connections if connections is not None else Connections()
        self._factory = _OutboundFactory(self.connections)
        self._parents = parents
        self._parent_tls = parent_tls
        # The routes of recent verdicts, plain and as a tunnel.
        self._routes = {
            tunnel: PerVerdict(functools.partial(route_for, tunnel=tunnel, parents=parents))
            for tunnel in (False, True)
        }

    def route(self, verdict: Verdict, tunnel: bool) -> Route:
        return self._routes[tunnel](verdict)

    def dial(self, route: Route) -> defer.Deferred[Outbound]:
        """
        Connect along C{route}; through a parent with a C{target}, the
        Deferred fires only once the parent has accepted our C{CONNECT}.
        Fails with L{UpstreamError}; cancelling stops the attempt.
        """
        if route.unix is not None:
            endpoint = endpoints.UNIXClientEndpoint(self._reactor, route.unix, self._timeout)
            return self._first([(endpoint, f"unix socket {route.unix}")])
        if route.parent is None:
            return self.connect(route.addresses, route.port)
        parent, target = route.parent, route.target
        d = self._dialParent(parent)
        if target is not None:
            d.addCallback(lambda out: _ParentConnect(out, parent, target).deferred)
        return d

    def _dialParent(self, parent: ParentProxy) -> defer.Deferred[Outbound]:
        ip = parse_ip_literal(parent.host)
        if ip is not None:
            d = self.connect((ip,), parent.port)
        else:
            endpoint = endpoints.HostnameEndpoint(
                self._reactor, parent.host, parent.port, timeout=self._timeout
            )
            d = self._first([(endpoint, f"the upstream proxy {parent.address}")])
        if parent.scheme == "https":
            d.addCallback(self._startParentTLS, parent)
        return d

    def _startParentTLS(self, out: Outbound, parent: ParentProxy) -> Outbound:
        out.transport.startTLS(self._parent_tls(parent.host))
        return out

    def connect(
        self, addresses: Sequence[IPAddress], port: int
    ) -> defer.Deferred[Outbound]:
        """
        Connect to the first of C{addresses} that accepts, on C{port}.
        Fails with L{UpstreamError} naming the last failure. Cancelling the
        Deferred stops the attempt in progress.
        """
        if not addresses:
            return defer.fail(
                UpstreamError(Reason.UPSTREAM_DNS_FAILED, "no address to connect to")
            )
        return self._first([(_TCPDial(self._reactor, str(ip), port, self._timeout), None) for ip in addresses])

    def _first(self, attempts: Sequence[Tuple[Any, Optional[str]]]) -> defer.Deferred[Outbound]:
        """
        The one dial path: connect an L{Outbound} through each endpoint in
        turn until one connects; fail with L{UpstreamError} describing the
        last failure (C{where} names it; C{None}: the endpoint's own C{str},
        built only then). Cancelling reaches the attempt in progress,
        through the chain.
        """
        if self._observe is None:
            return self._attempt(attempts)
        clock = cast(IReactorTime, self._reactor)
        return timed(self._attempt(attempts), clock, self._observe, clock.seconds())

    def _attempt(self, attempts: Sequence[Tuple[Any, Optional[str]]]) -> defer.Deferred[Outbound]:
        endpoint, where = attempts[0]

        def failed(failure: Failure) -> defer.Deferred[Outbound]:
            if failure.check(error.ConnectingCancelledError, defer.CancelledError):
                raise defer.CancelledError()
            if len(attempts) > 1:
                return self._attempt(attempts[1:])
            raise _classify(failure, str(endpoint) if where is None else where)

        d: defer.Deferred[Outbound] = endpoint.connect(self._factory)
        return d.addErrback(failed)
