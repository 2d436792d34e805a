"""
The HTTP proxy listener: absolute-form forwarding, CONNECT tunnels, websocket
upgrades and unix-socket targets.

One L{HTTPProxyProtocol} per client connection, an explicit state machine:

    HEAD ──head──▶ DECIDING ──allow──▶ DIALING ──connected──▶ EXCHANGE ──done──▶ HEAD
      │                │                  │                      │
      │              deny ──▶ error reply (keep-alive or close)  ├──CONNECT──▶ TUNNEL
      │                                                          ├──101 to a websocket upgrade──▶ TUNNEL
      └── bad bytes ──▶ 4xx reply, close                         └──CONNECT, intercept──▶ HEAD (TLS)

An intercepted CONNECT (limited mode with MITM, SPEC §6) answers C{200},
wraps both legs in TLS and goes back to HEAD on the same instance: inner
requests take the same path with protocol C{https}, the target pinned to the
tunnel's host, port and vetted addresses (C{_tunnel}).

The pending policy or dial Deferred is held in C{_work} so a client that goes
away cancels it. Client reading is gated by a set of pause reasons so the
state machine and back-pressure from the destination never undo each other.
Bodies stream both ways: no body is ever held whole in memory.
"""

from __future__ import annotations

import http
import json
import os
from typing import Any, Dict, Optional, Set, Tuple

from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy import _httphead
from codex_proxy.domains import InvalidHost, normalize_host
from codex_proxy.errors import ProtocolError, UpstreamError, reply_for
from codex_proxy.connections import Connections
from codex_proxy.mitm import Interceptor, OriginTLS, is_tls_failure
from codex_proxy.model import (
    UNIX_SOCKET_HOST,
    Protocol as Proto,
    ProxyRequest,
    Reason,
    Verdict,
)
from codex_proxy.policy import method_overrides
from codex_proxy.policyservice import PolicyService
from codex_proxy.relay import Relay
from codex_proxy.upstream import Outbound, Route, Sink, Upstream

_log = Logger()

HEAD = "HEAD"
DECIDING = "DECIDING"
DIALING = "DIALING"
EXCHANGE = "EXCHANGE"
TUNNEL = "TUNNEL"
CLOSED = "CLOSED"

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443}
_HTTPS_PORT = 443
_CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
#: Client bytes kept while a request is decided or served before reading
#: pauses. Reading is not paused per request: that costs two epoll calls
#: per request, and a client that does not pipeline sends nothing meanwhile.
_PENDING_LIMIT = 1 << 16
_UNIX_SOCKET_HEADER = b"x-unix-socket"


def _is_websocket_upgrade(head: _httphead.RequestHead) -> bool:
    """
    A body-less GET asking to upgrade to websocket: the only upgrade we pass
    on (SPEC §1); every other C{Upgrade} is dropped as hop-by-hop.
    """
    if head.method != "GET" or not head.upgrade or head.framing is not _httphead.NO_BODY:
        return False
    value = head.header(b"upgrade") or b""
    return b"websocket" in [token.strip().lower() for token in value.split(b",")]


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def _split_host_header(value: bytes, default_port: int) -> Tuple[str, int]:
    """
    Split a C{Host} header into normalised host and port, with the request
    target's authority rules (L{_httphead.split_authority}).
    """
    text = value.decode("ascii", "replace").strip()
    try:
        host, port = _httphead.split_authority(text, port_required=False)
        return normalize_host(host), default_port if port is None else port
    except (ProtocolError, InvalidHost) as e:
        raise ProtocolError(f"malformed Host header {text!r}: {e}")


def _resolve_socket_path(value: bytes) -> str:
    """
    The C{x-unix-socket} path with symlinks resolved, so it compares with the
    allowed paths resolved at load (SPEC §8). A relative path is returned
    as sent, for the policy to refuse. C{realpath} is a blocking filesystem
    call: a few local C{lstat}s per unix-socket request, accepted here
    rather than a thread hop per request.
    """
    path = value.decode("utf-8", "surrogateescape").strip()
    if not path.startswith("/") or "\0" in path:
        return path
    return os.path.realpath(path)


def _without(headers: _httphead.Headers, name: bytes) -> _httphead.Headers:
    return tuple((key, value) for key, value in headers if key.lower() != name)


def _noDelay(transport: Any) -> None:
    """
    Turn Nagle off: a proxy forwards what it has at once, and a response
    head and body written separately must not wait for a delayed ACK.
    """
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        setNoDelay(True)


@implementer(IPushProducer)
class _UpstreamBackpressure:
    """
    Registered on the destination's transport while a request body streams:
    when that transport's buffer fills, client reading pauses.
    """

    def __init__(self, proto: "HTTPProxyProtocol") -> None:
        self._proto = proto

    def pauseProducing(self) -> None:
        self._proto._pause("upstream")

    def resumeProducing(self) -> None:
        self._proto._resume("upstream")

    def stopProducing(self) -> None:
        pass


class HTTPProxyFactory(Factory):
    """
    Builds L{HTTPProxyProtocol}s sharing one policy service and dialer.

    @ivar connections: where client connections register while open.
    """

    noisy = False

    def __init__(
        self,
        policy: PolicyService,
        upstream: Upstream,
        clock: IReactorTime,
        head_limits: _httphead.HeadLimits = _httphead.HeadLimits(),
        tunnel_idle: float = 3600.0,
        header_timeout: float = 30.0,
        keepalive_idle: float = 120.0,
        connections: Optional[Connections] = None,
        mitm: Optional[Interceptor] = None,
        response_timeout: float = 300.0,
        origin_tls: Optional[OriginTLS] = None,
    ) -> None:
        """
        @param origin_tls: client TLS toward origins for absolute-form
            C{https://} requests (default: the interceptor's, if any); without
            either such requests fail with C{upstream-tls-failed}.
        @param response_timeout: how long a plain exchange may go without a
            byte in either direction (a destination that accepted and never
            answers): 504 before the response began, else both closed.
        """
        self.policy = policy
        self.upstream = upstream
        self.clock = clock
        self.head_limits = head_limits
        self.tunnel_idle = tunnel_idle
        self.header_timeout = header_timeout
        self.keepalive_idle = keepalive_idle
        self.response_timeout = response_timeout
        self.connections = connections if connections is not None else Connections()
        self.mitm = mitm
        self.origin_tls: Optional[OriginTLS] = origin_tls if origin_tls is not None else mitm

    def buildProtocol(self, addr: object) -> "HTTPProxyProtocol":
        proto = HTTPProxyProtocol()
        proto.factory = self
        return proto


@implementer(IHalfCloseableProtocol)
class HTTPProxyProtocol(Protocol, Sink):
    """
    One client connection of the HTTP listener.
    """

    factory: HTTPProxyFactory

    def __init__(self) -> None:
        self._state = HEAD
        self._paused: Set[str] = set()
        self._pending = b""
        self._work: Optional[defer.Deferred[Any]] = None
        self._clientEOF = False
        self._overloaded = False
        # The current exchange.
        self._head: Optional[_httphead.RequestHead] = None
        self._request: Optional[ProxyRequest] = None
        self._reqReader: Optional[_httphead.BodyReader] = None
        self._reqDone = True
        self._respParser: Optional[_httphead.ResponseHeadParser] = None
        self._respReader: Optional[_httphead.BodyReader] = None
        self._respStarted = False
        self._respKeepAlive = False
        self._closeAfter = False
        self._reused = False
        # The destination connection, kept across exchanges when possible.
        self._out: Optional[Outbound] = None
        self._outKey: Optional[Route] = None
        # The host the destination connection's TLS was opened for, if any.
        self._outTLS: Optional[str] = None
        self._relay: Optional[Relay] = None
        # One timer while waiting for a head: keep-alive idle (close quietly)
        # until a byte arrives, then the header timeout (408); during an
        # exchange, the response timeout, which compares C{_moved} (chunks
        # relayed either way) between checks.
        self._timer: Optional[IDelayedCall] = None
        self._idle = False
        self._moved = 0
        self._seen = 0
        self._lastActive = 0.0
        # The allowed verdict of the CONNECT being set up, then of the
        # intercepted tunnel this connection has become.
        self._verdict: Optional[Verdict] = None
        self._tunnel: Optional[Verdict] = None

    # -- connection events ------------------------------------------------

    def connectionMade(self) -> None:
        # Over limits.max_connections: the first request is answered 503.
        self._overloaded = not self.factory.connections.admit(self.transport)
        _noDelay(self.transport)
        self._parser = _httphead.RequestHeadParser(self.factory.head_limits)
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        self._client = f"{host}:{peer.port}" if host else None
        self._waitForHead(idle=False)

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state is TUNNEL:
            self._relay.fromClient(data)  # type: ignore[union-attr]
        elif state is EXCHANGE and not self._reqDone:
            self._feedRequestBody(data)
        elif state is HEAD:
            if self._idle:
                self._waitForHead(idle=False)
            self._feedHead(data)
        elif state is not CLOSED:
            # Bytes that arrive while a request is decided or served (its
            # body, or the next request): kept, up to a bound.
            self._pending += data
            if len(self._pending) >= _PENDING_LIMIT:
                self._pause("pending")

    def readConnectionLost(self) -> None:
        self._clientEOF = True
        if self._state is TUNNEL:
            self._relay.clientEOF()  # type: ignore[union-attr]
        elif self._state is HEAD:
            # Between requests, or inside a head that can now never end.
            self._state = CLOSED
            self.transport.loseConnection()
        elif self._state is EXCHANGE and not self._reqDone:
            # The request body was cut short: nothing sensible can follow.
            self._abort()
        else:
            self._closeAfter = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.factory.connections.closed(self.transport)
        self._state = CLOSED
        self._stopTimer()
        work, self._work = self._work, None
        if work is not None:
            work.cancel()
        if self._relay is not None:
            self._relay.clientLost()
        elif self._out is not None:
            self._out.transport.loseConnection()
            self._out = None

    # -- read gate --------------------------------------------------------

    def _pause(self, why: str) -> None:
        if not self._paused:
            self.transport.pauseProducing()
        self._paused.add(why)

    def _resume(self, why: str) -> None:
        self._paused.discard(why)
        if not self._paused and self._state is not CLOSED:
            self.transport.resumeProducing()

    # -- timers -----------------------------------------------------------

    def _waitForHead(self, idle: bool) -> None:
        """
        (Re)arm the one timer of the HEAD state: between requests the
        keep-alive idle limit, once a head has begun the header timeout.
        """
        self._stopTimer()
        self._idle = idle
        factory = self.factory
        if idle:
            self._timer = factory.clock.callLater(factory.keepalive_idle, self._idleTimeout)
        else:
            self._timer = factory.clock.callLater(factory.header_timeout, self._headerTimeout)

    def _stopTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _watchExchange(self) -> None:
        """
        Start the response timeout of the exchange just begun.
        """
        self._stopTimer()
        clock = self.factory.clock
        self._seen = self._moved
        self._lastActive = clock.seconds()
        self._timer = clock.callLater(self.factory.response_timeout / 4, self._checkExchange)

    def _checkExchange(self) -> None:
        # A quarter period at a time, like the relay's idle check: the hot
        # path only counts chunks, and a silent exchange ends between 1 and
        # 1.25 periods after its last byte.
        self._timer = None
        if self._state is not EXCHANGE:
            return
        clock = self.factory.clock
        timeout = self.factory.response_timeout
        now = clock.seconds()
        if self._moved != self._seen:
            self._seen = self._moved
            self._lastActive = now
        elif now - self._lastActive >= timeout:
            self._exchangeTimedOut()
            return
        self._timer = clock.callLater(timeout / 4, self._checkExchange)

    def _exchangeTimedOut(self) -> None:
        """
        Nothing moved for C{response_timeout} seconds: the destination is
        dropped; a client still waiting for a response head gets 504.
        """
        if self._respStarted:
            self._abort()
            return
        self._dropOutbound()
        request = self._request
        assert request is not None
        self._sendFailure(
            Reason.UPSTREAM_TIMEOUT,
            f"{request.host}:{request.port} sent no response within"
            f" {self.factory.response_timeout:g}s",
        )

    def _idleTimeout(self) -> None:
        self._timer = None
        self._state = CLOSED
        self.transport.loseConnection()

    def _headerTimeout(self) -> None:
        self._timer = None
        self._badRequest(
            ProtocolError(
                f"the request head did not arrive within {self.factory.header_timeout:g}s",
                status=408,
            )
        )

    # -- request head -----------------------------------------------------

    def _feedHead(self, data: bytes) -> None:
        try:
            result = self._parser.feed(data)
        except ProtocolError as e:
            self._badRequest(e)
            return
        if result is None:
            return
        head, self._pending = result
        self._stopTimer()
        if len(self._pending) >= _PENDING_LIMIT:
            self._pause("pending")
        self._head = head
        try:
            request = self._requestFor(head)
        except ProtocolError as e:
            self._badRequest(e)
            return
        self._request = request
        self._closeAfter = not head.keep_alive or self._clientEOF
        if self._overloaded:
            self._closeAfter = True
            self._sendBlocked(
                self.factory.policy.refuse(request, Reason.TOO_MANY_CONNECTIONS)
            )
            return
        self._state = DECIDING
        if self._tunnel is not None:
            d = self.factory.policy.check_pinned(request, self._tunnel)
        else:
            d = self.factory.policy.check(request)
        self._work = d
        d.addCallbacks(self._decided, self._checkFailed)
        d.addErrback(self._internalError)

    def _requestFor(self, head: _httphead.RequestHead) -> ProxyRequest:
        if self._tunnel is not None:
            return self._innerRequest(head, self._tunnel)
        if head.form == "authority":
            assert head.host is not None and head.port is not None
            protocol, host, port = Proto.HTTPS_CONNECT, head.host, head.port
        elif head.form == "absolute":
            if head.scheme not in _DEFAULT_PORTS:
                raise ProtocolError(
                    f"unsupported scheme {head.scheme!r} in absolute-form request"
                    " (use CONNECT for wss)"
                )
            assert head.host is not None and head.port is not None
            # https://: plain HTTP to us, TLS from us to the origin.
            protocol = Proto.HTTPS if head.scheme == "https" else Proto.HTTP
            host, port = head.host, head.port
            self._checkHostHeader(head, host, port)
        elif head.form == "origin":
            value = head.header(b"host")
            if not value:
                raise ProtocolError("origin-form request without a Host header")
            host, port = _split_host_header(value, 80)
            protocol = Proto.HTTP
        else:
            raise ProtocolError(f"a proxy cannot serve request target {head.target!r}")
        unix_socket = None
        socket_header = head.header(_UNIX_SOCKET_HEADER)
        if socket_header is not None and protocol is Proto.HTTP:
            unix_socket = _resolve_socket_path(socket_header)
            host, port = UNIX_SOCKET_HOST, 0
        return ProxyRequest(
            protocol=protocol,
            host=host,
            port=port,
            method=head.method,
            has_body=head.framing is not _httphead.NO_BODY,
            upgrade=head.upgrade,
            override_methods=method_overrides(head.headers, head.path),
            client=self._client,
            unix_socket=unix_socket,
        )

    def _innerRequest(self, head: _httphead.RequestHead, tunnel: Verdict) -> ProxyRequest:
        """
        A request inside an intercepted tunnel: its target must be the
        tunnel's own host and port (SPEC §6), named by C{Host}.
        """
        if head.form == "authority":
            raise ProtocolError(
                f"CONNECT {head.target} inside the intercepted tunnel to"
                f" {tunnel.host}:{tunnel.port}",
                405,
            )
        value = head.header(b"host")
        if not value:
            raise ProtocolError("request without a Host header inside an intercepted tunnel")
        named = [_split_host_header(value, _HTTPS_PORT)]
        if head.form == "absolute":
            assert head.host is not None and head.port is not None
            if head.scheme != "https":
                raise ProtocolError(
                    f"{head.scheme}:// request inside an intercepted https tunnel", 421
                )
            try:
                named.append((normalize_host(head.host), head.port))
            except InvalidHost:
                raise ProtocolError(f"malformed request target {head.target!r}")
        for host, port in named:
            if (host, port) != (tunnel.host, tunnel.port):
                raise ProtocolError(
                    f"request for {host}:{port} inside the tunnel to"
                    f" {tunnel.host}:{tunnel.port}",
                    421,
                )
        return ProxyRequest(
            protocol=Proto.HTTPS,
            host=tunnel.host,
            port=tunnel.port,
            method=head.method,
            has_body=head.framing is not _httphead.NO_BODY,
            upgrade=head.upgrade,
            override_methods=method_overrides(head.headers, head.path),
            client=self._client,
        )

    def _checkHostHeader(self, head: _httphead.RequestHead, host: str, port: int) -> None:
        value = head.header(b"host")
        if value is None:
            return
        try:
            target = normalize_host(host)
        except InvalidHost:
            return  # The policy reports the invalid target itself.
        if _split_host_header(value, _DEFAULT_PORTS[head.scheme or "http"]) != (target, port):
            raise ProtocolError(
                f"Host header {value.decode('ascii', 'replace')!r} does not match"
                f" the request target {host}:{port}"
            )

    # -- decision ---------------------------------------------------------

    def _decided(self, verdict: Verdict) -> None:
        self._work = None
        if self._state is CLOSED:
            return
        if not verdict.allowed:
            self._sendBlocked(verdict)
            return
        assert self._request is not None
        if verdict.intercept and self.factory.mitm is None:
            # The policy asked for interception that this listener cannot do.
            _log.error(
                "refusing an intercepted CONNECT to {host}: no MITM configured",
                host=verdict.host,
            )
            self._abort()
            return
        self._verdict = verdict
        if self._tlsHost() is not None and self.factory.origin_tls is None:
            self._sendFailure(
                Reason.UPSTREAM_TLS_FAILED, "no trust store for TLS to the destination"
            )
            return
        # TLS targets (CONNECT, and the upstream leg of an intercepted
        # tunnel) reach a parent proxy through a chained CONNECT.
        key = self.factory.upstream.route(
            verdict, tunnel=self._request.protocol in (Proto.HTTPS_CONNECT, Proto.HTTPS)
        )
        if self._out is not None:
            if (
                self._outKey == key
                and self._outTLS == self._tlsHost()
                and self._request.protocol is not Proto.HTTPS_CONNECT
            ):
                self._reused = True
                self._startExchange()
                return
            self._dropOutbound()
        self._dial(key)

    def _dial(self, key: Route) -> None:
        self._state = DIALING
        self._reused = False
        d = self.factory.upstream.dial(key)
        self._work = d
        d.addCallbacks(lambda out: self._connected(out, key), self._failed)
        d.addErrback(self._internalError)

    def _checkFailed(self, failure: Failure) -> None:
        self._work = None
        if failure.check(defer.CancelledError) and self._state is CLOSED:
            return
        self._failed(failure)

    def _failed(self, failure: Failure) -> None:
        self._work = None
        if self._state is CLOSED:
            return
        failure.trap(UpstreamError)
        self._sendFailure(
            failure.value.reason, failure.value.message, failure.value.upstream_status
        )

    def _internalError(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError) and self._state is CLOSED:
            return
        _log.failure("internal error handling a proxy request", failure)
        if self._state is not CLOSED:
            self._abort()

    def _connected(self, out: Outbound, key: Route) -> None:
        self._work = None
        _noDelay(out.transport)
        out.attach(self)
        self._out = out
        self._outKey = key
        assert self._request is not None
        if self._request.protocol is Proto.HTTPS_CONNECT:
            assert self._verdict is not None
            if self._verdict.intercept:
                self._startIntercept(out, self._verdict)
            else:
                self._startTunnel(out)
            return
        tls = self._tlsHost()
        if tls is not None:
            self._upstreamTLS(out, tls)
        out.transport.registerProducer(_UpstreamBackpressure(self), True)
        self._startExchange()

    # -- CONNECT ----------------------------------------------------------

    def _startTunnel(self, out: Outbound) -> None:
        self.transport.write(_CONNECT_OK)
        self._joinRelay(out, out.early)

    def _joinRelay(self, out: Outbound, fromServer: bytes) -> None:
        """
        Become a byte tunnel between the client and C{out}, first relaying
        C{fromServer} (bytes the destination already sent) and what the
        client pipelined.
        """
        self._state = TUNNEL
        self._stopTimer()
        if self.transport.producer is not None:
            self.transport.unregisterProducer()
        if out.transport.producer is not None:
            out.transport.unregisterProducer()
        self._relay = Relay(
            self.transport, out.transport, self.factory.clock, self.factory.tunnel_idle
        )
        self._paused.clear()
        self.transport.resumeProducing()
        if fromServer:
            self._relay.fromServer(fromServer)
        pending, self._pending = self._pending, b""
        if pending:
            self._relay.fromClient(pending)
        if self._clientEOF:
            self._relay.clientEOF()

    # -- intercepted CONNECT (MITM) ---------------------------------------

    def _startIntercept(self, out: Outbound, verdict: Verdict) -> None:
        """
        Answer C{200}, terminate the client's TLS with a leaf for the
        tunnel's host, wrap the already dialled upstream connection in
        client TLS, and read inner requests.
        """
        mitm = self.factory.mitm
        assert mitm is not None
        self._tunnel = verdict
        self._upstreamTLS(out, verdict.host)
        out.transport.registerProducer(_UpstreamBackpressure(self), True)
        self.transport.write(_CONNECT_OK)
        # Bytes that came with the CONNECT belong to the TLS handshake: hand
        # them to the TLS layer startTLS put under this protocol.
        pending, self._pending = self._pending, b""
        self.transport.startTLS(mitm.server_tls(verdict.host))
        if pending:
            self.transport.protocol.dataReceived(pending)
        self._closeAfter = self._clientEOF
        self._exchangeDone()

    def _tlsHost(self) -> Optional[str]:
        """
        The origin this exchange speaks TLS with: the host of an intercepted
        tunnel, or of an absolute-form C{https://} request; else C{None}.
        """
        if self._tunnel is not None:
            return self._tunnel.host
        if self._request is not None and self._request.protocol is Proto.HTTPS:
            assert self._verdict is not None
            return self._verdict.host
        return None

    def _upstreamTLS(self, out: Outbound, host: str) -> None:
        """
        Client TLS over the dialled connection, checked against the origin
        trust store and C{host} (SPEC §6, §7).
        """
        out.transport.startTLS(self.factory.origin_tls.client_tls(host))
        self._outTLS = host

    # -- plain HTTP exchange ----------------------------------------------

    def _startExchange(self) -> None:
        head = self._head
        assert head is not None and self._out is not None
        self._state = EXCHANGE
        route = self._outKey
        assert route is not None
        headers = _httphead.strip_hop_by_hop(head.headers)
        if head.header(b"host") is None:
            headers += ((b"Host", self._hostHeader(head).encode("ascii")),)
        if head.framing is _httphead.CHUNKED:
            headers += ((b"Transfer-Encoding", b"chunked"),)
        target = head.path if head.form == "absolute" else head.target
        if route.unix is not None:
            headers = _without(headers, _UNIX_SOCKET_HEADER)
        if route.absolute_form:
            target, headers = self._toParent(route, target, headers)
        if _is_websocket_upgrade(head):
            headers += (
                (b"Connection", b"Upgrade"),
                (b"Upgrade", head.header(b"upgrade") or b"websocket"),
            )
        elif self._closeAfter:
            headers += ((b"Connection", b"close"),)
        out = self._out.transport
        out.write(_httphead.serialize_request_head(head.method, target, headers))
        self._watchExchange()
        self._respParser = _httphead.ResponseHeadParser(head.method, self.factory.head_limits)
        self._respReader = None
        self._respStarted = False
        # Back-pressure from a slow client pauses reading the destination.
        if self.transport.producer is not None:
            self.transport.unregisterProducer()
        self.transport.registerProducer(out, True)
        self._reqReader = _httphead.body_reader(head.framing)
        self._reqDone = self._reqReader is None
        pending, self._pending = self._pending, b""
        if not self._reqDone and pending:
            self._feedRequestBody(pending)
        elif pending:
            self._pending = pending
        if self._state is EXCHANGE and len(self._pending) < _PENDING_LIMIT:
            self._resume("pending")

    def _toParent(
        self, route: Route, path: str, headers: _httphead.Headers
    ) -> Tuple[str, _httphead.Headers]:
        """
        The absolute-form target and headers of a plain request through a
        parent proxy (SPEC §7), with our credentials for the parent.
        """
        request = self._request
        assert request is not None and route.parent is not None
        host = normalize_host(request.host)
        authority = f"[{host}]" if ":" in host else host
        if request.port != 80:
            authority += f":{request.port}"
        if route.parent.authorization is not None:
            headers += ((b"Proxy-Authorization", route.parent.authorization),)
        return f"http://{authority}{path}", headers

    def _hostHeader(self, head: _httphead.RequestHead) -> str:
        default = _DEFAULT_PORTS.get(head.scheme or "http", 80)
        return head.host if head.port == default else f"{head.host}:{head.port}"  # type: ignore[return-value]

    def _feedRequestBody(self, data: bytes) -> None:
        assert self._reqReader is not None and self._out is not None
        self._moved += 1
        try:
            chunk, done, rest = self._reqReader.feed(data)
        except ProtocolError as e:
            self._badRequest(e)
            return
        if chunk:
            self._out.transport.write(chunk)
        if done:
            self._reqDone = True
            self._reqReader = None
            self._pending += rest
            if len(self._pending) >= _PENDING_LIMIT:
                self._pause("pending")

    def outboundData(self, data: bytes) -> None:
        state = self._state
        if state is TUNNEL:
            self._relay.fromServer(data)  # type: ignore[union-attr]
        elif state is EXCHANGE:
            self._feedResponse(data)
        else:
            # An idle keep-alive destination must not speak.
            self._dropOutbound()

    def outboundEOF(self) -> None:
        if self._state is TUNNEL:
            self._relay.serverEOF()  # type: ignore[union-attr]
        elif self._out is not None:
            self._out.transport.loseConnection()

    def outboundLost(self, reason: Failure) -> None:
        state = self._state
        if state is TUNNEL:
            self._relay.serverLost()  # type: ignore[union-attr]
            return
        key, tls = self._outKey, self._outTLS
        self._out = None
        self._outKey = None
        self._outTLS = None
        if state is not EXCHANGE:
            return
        assert self._head is not None and key is not None
        if isinstance(self._respReader, _httphead.UntilCloseReader):
            self._responseDone(b"", reusable=False)
        elif not self._respStarted and tls is not None and is_tls_failure(reason):
            self._sendFailure(
                Reason.UPSTREAM_TLS_FAILED,
                f"TLS with {tls}:{self._request.port if self._request else 443} failed:"
                f" {reason.getErrorMessage()}",
            )
        elif not self._respStarted and self._reused and self._head.framing is _httphead.NO_BODY:
            # A kept-alive connection closed under us before answering: safe
            # to send the body-less request once more on a fresh connection.
            self._dial(key)
        elif not self._respStarted:
            self._sendFailure(
                Reason.UPSTREAM_BAD_RESPONSE,
                "the destination closed the connection without a response",
            )
        else:
            self._abort()

    def _feedResponse(self, data: bytes) -> None:
        self._moved += 1
        while self._respReader is None:
            assert self._respParser is not None
            try:
                result = self._respParser.feed(data)
            except ProtocolError as e:
                self._upstreamBroken(e.message)
                return
            if result is None:
                return
            head, data = result
            self._respStarted = True
            if head.status == 101:
                self._switchProtocols(head, data)
                return
            if head.status < 200:
                # Interim responses (100 Continue) go to HTTP/1.1 clients only.
                if self._head is not None and self._head.version >= (1, 1):
                    self.transport.write(
                        _httphead.serialize_response_head(
                            (1, 1), head.status, head.reason, _httphead.strip_hop_by_hop(head.headers)
                        )
                    )
                self._respParser = _httphead.ResponseHeadParser(
                    self._head.method if self._head else "GET", self.factory.head_limits
                )
                continue
            if not self._startResponse(head):
                self._responseDone(data, reusable=head.keep_alive)
                return
        if not data:
            return
        try:
            chunk, done, rest = self._respReader.feed(data)
        except ProtocolError as e:
            self._upstreamBroken(e.message)
            return
        if chunk:
            self.transport.write(chunk)
        if done:
            self._responseDone(rest, reusable=self._respKeepAlive)

    def _switchProtocols(self, head: _httphead.ResponseHead, rest: bytes) -> None:
        """
        A C{101} answer: accepted only for a websocket upgrade we forwarded,
        after which the connection is a tunnel both ways.
        """
        request = self._head
        assert request is not None and self._out is not None
        upgrade = head.header(b"upgrade")
        if not _is_websocket_upgrade(request) or upgrade is None:
            self._respStarted = False
            self._upstreamBroken("unexpected 101 Switching Protocols")
            return
        headers = _httphead.strip_hop_by_hop(head.headers) + (
            (b"Connection", b"Upgrade"),
            (b"Upgrade", upgrade),
        )
        self.transport.write(
            _httphead.serialize_response_head((1, 1), 101, head.reason, headers)
        )
        self._respParser = None
        self._joinRelay(self._out, rest)

    def _startResponse(self, head: _httphead.ResponseHead) -> bool:
        """
        Send the response head; return whether a body follows.
        """
        request = self._head
        assert request is not None
        headers = _httphead.strip_hop_by_hop(head.headers)
        framing = head.framing
        reader: Optional[_httphead.BodyReader]
        if framing is _httphead.CHUNKED and request.version >= (1, 1):
            headers += ((b"Transfer-Encoding", b"chunked"),)
            reader = _httphead.ChunkedReader(limits=self.factory.head_limits)
        elif framing is _httphead.CHUNKED:
            reader = _httphead.ChunkedReader(decode=True, limits=self.factory.head_limits)
            self._closeAfter = True
        else:
            reader = _httphead.body_reader(framing)
            if framing is _httphead.UNTIL_CLOSE:
                self._closeAfter = True
        if self._closeAfter:
            headers += ((b"Connection", b"close"),)
        elif request.version < (1, 1):
            headers += ((b"Connection", b"keep-alive"),)
        self.transport.write(
            _httphead.serialize_response_head((1, 1), head.status, head.reason, headers)
        )
        self._respKeepAlive = head.keep_alive
        self._respReader = reader
        return reader is not None

    def _responseDone(self, rest: bytes, reusable: bool) -> None:
        self._respParser = None
        self._respReader = None
        if rest or not reusable or not self._reqDone:
            self._dropOutbound()
        if not self._reqDone:
            # The destination answered before the whole body was sent (e.g.
            # 413): the client's remaining bytes cannot be resynchronised.
            self._closeAfter = True
        self._exchangeDone()

    def _exchangeDone(self) -> None:
        self._head = None
        self._request = None
        self._respStarted = False
        if self._closeAfter:
            self._state = CLOSED
            self.transport.loseConnection()
            return
        self._state = HEAD
        self._reqDone = True
        pending, self._pending = self._pending, b""
        self._waitForHead(idle=not pending)
        self._resume("pending")
        if pending:
            self._feedHead(pending)

    def _upstreamBroken(self, message: str) -> None:
        self._dropOutbound()
        if self._respStarted and self._respReader is not None:
            self._abort()
        else:
            self._sendFailure(Reason.UPSTREAM_BAD_RESPONSE, message)

    def _dropOutbound(self) -> None:
        out, self._out = self._out, None
        self._outKey = None
        self._outTLS = None
        if out is not None:
            out.sink = None
            out.transport.loseConnection()
            # Its back-pressure on the client ends with it.
            if "upstream" in self._paused:
                self._resume("upstream")

    # -- replies of our own -----------------------------------------------

    def _sendBlocked(self, verdict: Verdict) -> None:
        assert verdict.reason is not None
        reply = reply_for(verdict.reason)
        self._reply(
            reply.status,
            reply.header,
            {
                "status": "blocked",
                "host": verdict.host,
                "port": verdict.port,
                "reason": verdict.reason.value,
                "decision": verdict.decision.value,
                "source": verdict.source.value,
                "protocol": verdict.request.protocol.value,
                "message": reply.message,
            },
        )

    def _sendFailure(
        self, reason: Reason, message: str, upstream_status: Optional[int] = None
    ) -> None:
        reply = reply_for(reason)
        request = self._request
        body: Dict[str, Any] = {
            "status": "error",
            "host": request.host if request else None,
            "port": request.port if request else None,
            "reason": reason.value,
            "protocol": request.protocol.value if request else None,
            "message": message,
        }
        if upstream_status is not None:
            body["upstream_status"] = upstream_status
        self._reply(reply.status, reply.header, body)

    def _badRequest(self, e: ProtocolError) -> None:
        self._closeAfter = True
        self._reply(
            e.status,
            None,
            {"status": "error", "reason": "bad_request", "message": e.message},
        )

    def _reply(self, status: int, header: Optional[str], body: Dict[str, Any]) -> None:
        """
        Answer the current request ourselves. The connection stays open only
        when the request had no body we would have to skip, and was no CONNECT.
        """
        if self._state is CLOSED:
            return
        if self._respStarted:
            self._abort()
            return
        head = self._head
        if head is None or head.framing is not _httphead.NO_BODY or head.form == "authority":
            self._closeAfter = True
        if self._out is not None and not self._reqDone:
            self._dropOutbound()
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8") + b"\n"
        lines = [b"HTTP/1.1 %d %s" % (status, _phrase(status))]
        if header is not None:
            lines.append(b"x-proxy-error: " + header.encode("ascii"))
        lines.append(b"Content-Type: application/json")
        lines.append(b"Content-Length: %d" % len(payload))
        lines.append(b"Connection: close" if self._closeAfter else b"Connection: keep-alive")
        data = b"\r\n".join(lines) + b"\r\n\r\n"
        if head is None or head.method != "HEAD":
            data += payload
        self.transport.write(data)
        self._respParser = None
        self._reqDone = True
        self._exchangeDone()

    def _abort(self) -> None:
        self._state = CLOSED
        self._dropOutbound()
        self.transport.abortConnection()
