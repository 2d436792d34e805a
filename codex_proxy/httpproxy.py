"""
The HTTP proxy listener: absolute-form forwarding, CONNECT tunnels, websocket
upgrades, unix-socket targets and intercepted (MITM) tunnels.

One L{HTTPProxyProtocol} per client connection, a state machine. Each
state holds what may be pending in it, and nothing else; closing releases
exactly that (C{abandon}):

    state          holds                            leaves by
    ReadingHead    timer, next-head step, kept leg  head ─▶ Deciding; bad bytes, 408 ─▶ reply, close;
                                                    idle, EOF ─▶ Closing
    Deciding       policy Deferred, kept leg        deny ─▶ reply ─▶ ReadingHead | Closing;
                                                    allow ─▶ Dialling, or Exchanging on the kept leg
    Dialling       dial Deferred                    failed ─▶ reply ─▶ ReadingHead | Closing;
                                                    CONNECT ─▶ Tunnelling;
                                                    CONNECT, intercept ─▶ ReadingHead (inside TLS);
                                                    request ─▶ Exchanging
    Exchanging     the Exchange (its leg, timer)    done ─▶ ReadingHead | Closing; failed ─▶ reply;
                                                    broken ─▶ Closing; 101 ─▶ Tunnelling;
                                                    retry ─▶ Dialling
    Tunnelling     (the relay, on the connection)   either side closes ─▶ Closing
    Closing        nothing

The states are defined in L{codex_proxy._httpstates}; every transition is
here, one place each.

Intercepting is the connection's C{_tunnel} context: after C{200} the
client's TLS is terminated here and inner requests take the same states
with protocol C{https}, the target pinned to the tunnel's host, port and
vetted addresses, decided and vetted again under the current policy.

Our own replies lead back to C{ReadingHead}, which reads pipelined bytes
from the reactor, never from inside the reply, and only while the client's
write buffer is below its high-water mark. Bodies stream both ways.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Optional

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy import _httpbody, _httphead, _httptarget, errors
from codex_proxy._connection import OVER_LIMIT, ClientConnection, client_address, tune
from codex_proxy._exchange import Exchange, IExchangeOwner
from codex_proxy._legs import Leg, LegPool
from codex_proxy._httpstates import (
    CLOSING,
    Deciding,
    Dialling,
    Exchanging,
    IHeadOwner,
    Job,
    ReadingHead,
    State,
    Tunnelling,
)
from codex_proxy._text import escape
from codex_proxy._turnwrites import TURN_WRITES
from codex_proxy.connections import Connections
from codex_proxy.mitm import Interceptor, OriginTLS
from codex_proxy.model import Protocol as Proto, Reason, Verdict
from codex_proxy.policyservice import PolicyService
from codex_proxy.secrets import Secrets
from codex_proxy.relay import Timer
from codex_proxy.upstream import IUpstream, Outbound, Route

_log = Logger()

_CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
#: This process's C{Via} pseudonym (SPEC §4.2b): a request carrying it
#: went round a loop.
INSTANCE = secrets.token_hex(8)


def _resolve_socket(path: str) -> str:
    """
    An absolute C{x-unix-socket} path with symlinks resolved, to compare with
    the allowed paths resolved at load (SPEC §8). It blocks for a few local
    C{lstat}s per unix-socket request, cheaper than a thread hop.
    """
    return os.path.realpath(path)


class HTTPProxyFactory(Factory["HTTPProxyProtocol"]):
    """
    Builds L{HTTPProxyProtocol}s sharing one policy service and dialer.

    @ivar connections: where client connections register while open.
    @ivar via: our C{Via} entry, added to forwarded requests.
    """

    noisy = False

    def __init__(
        self,
        policy: PolicyService,
        upstream: IUpstream,
        clock: IReactorTime,
        head_limits: _httpbody.HeadLimits = _httpbody.HeadLimits(),
        tunnel_idle: float = 3600.0,
        header_timeout: float = 30.0,
        keepalive_idle: float = 120.0,
        connections: Optional[Connections] = None,
        mitm: Optional[Interceptor] = None,
        response_timeout: float = 300.0,
        origin_tls: Optional[OriginTLS] = None,
        instance: str = INSTANCE,
        secrets: Optional[Secrets] = None,
    ) -> None:
        """
        @param origin_tls: client TLS toward origins for absolute-form
            C{https://} requests (default: the interceptor's, if any); without
            either such requests fail with C{upstream-tls-failed}.
        @param response_timeout: how long a plain exchange may go without a
            byte in either direction (a destination that accepted and never
            answers): 504 before the response began, else both closed.
        @param instance: the C{Via} pseudonym (default: random per process).
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
        self.via = _httptarget.via_value(instance)
        self.secrets = secrets
        #: Destination connections idle between client connections.
        self.legs = LegPool(clock)

    def stopFactory(self) -> None:
        self.legs.clear()

    @property
    def placeholders(self) -> bool:
        """
        Header values are scanned for secret placeholders: only while some
        secret is configured (none can be misused otherwise).
        """
        return self.secrets is not None and bool(self.secrets.placeholders)

    def buildProtocol(self, addr: Optional[IAddress]) -> "HTTPProxyProtocol":
        proto = HTTPProxyProtocol()
        proto.factory = self
        proto.client = client_address(addr)
        return proto


@implementer(IHalfCloseableProtocol, IExchangeOwner, IHeadOwner)
class HTTPProxyProtocol(ClientConnection):
    """
    One client connection of the HTTP listener.
    """

    listener = "http"
    factory: HTTPProxyFactory
    #: What an intercepted tunnel's client is told before its TLS starts.
    tunnelAnswer = _CONNECT_OK
    #: A new connection whose request may have arrived with it: read at once.
    speaksFirst = True

    def connectionMade(self) -> None:
        super().connectionMade()
        tune(self.transport)
        self._parser = _httphead.RequestHeadParser(self.factory.head_limits)
        self._timer = Timer(self.factory.clock)
        # The verdict of the intercepted tunnel this connection has become.
        self._tunnel: Optional[Verdict] = None
        self._state: State = CLOSING
        self._readHead(None, idle=False)
        if self.speaksFirst:
            TURN_WRITES.readNow(self.transport)

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.fromClient(data)
            return
        state = self._state
        if isinstance(state, Exchanging) and state.exchange.wantsBody:
            rest = state.exchange.fromClient(data)
            if rest:
                self.keep(rest)
        elif isinstance(state, ReadingHead):
            state.fromClient(data)
        elif not self.closing:
            # The next request, or bytes that arrive while one is decided or
            # served: kept, up to a bound.
            self.keep(data)

    def readConnectionLost(self) -> None:
        self.clientEOF = True
        state = self._state
        if self.relay is not None:
            self.relay.clientEOF()
        elif isinstance(state, Exchanging) and state.exchange.wantsBody:
            # The request body was cut short: nothing sensible can follow.
            self.abort("bad_request")
        elif self.pending:
            # Pipelined requests are still to be answered; the last closes.
            return
        elif isinstance(state, ReadingHead):
            # Between requests, or inside a head that can now never end.
            self.close()
        elif isinstance(state, Exchanging):
            state.exchange.close = True
        elif isinstance(state, (Deciding, Dialling)):
            state.job.close = True

    def abandon(self) -> None:
        state, self._state = self._state, CLOSING
        state.release()
        self._timer.stop()

    def writesDrained(self) -> None:
        if isinstance(self._state, ReadingHead):
            self._state.stepSoon()

    # -- reading heads --------------------------------------------------------

    def _readHead(self, kept: Optional[Leg], idle: bool = True) -> None:
        """
        Wait for the next request head, keeping C{kept} for it.
        """
        if self.clientEOF and not self.pending:
            if kept is not None:
                kept.release()
            self.close()
            return
        if idle:
            # After a request: what the connection wrote (its replies) now
            # counts against back-pressure. Before the first, nothing has.
            self.watchWrites()
        factory = self.factory
        self._state = ReadingHead(
            self, self._parser, factory.clock, self._timer, factory.keepalive_idle, factory.header_timeout, kept, idle
        )

    def headArrived(self, head: _httphead.RequestHead, kept: Optional[Leg]) -> None:
        try:
            request = _httptarget.request_of(
                head, self._tunnel, self.client, _resolve_socket, self.factory.placeholders, self.identity
            )
        except errors.ProtocolError as e:
            if kept is not None:
                kept.drop()
            self.refuseHead(head, e)
            return
        refusal = self.admitHTTP(head, tunnelled=self._tunnel is not None)
        job = Job(head, self.identified(request), close=not head.keep_alive or (self.clientEOF and not self.pending))
        factory = self.factory
        if refusal is not None:
            job.close = job.close or refusal in OVER_LIMIT
            self._blocked(job, factory.policy.refuse(job.request, refusal), kept)
        elif self._tunnel is not None:
            self._verdict(job, factory.policy.decide_pinned(job.request, self._tunnel), kept)
        elif (verdict := factory.policy.decide_now(job.request)) is not None:
            self._verdict(job, verdict, kept)
        else:
            self._decide(job, factory.policy.check(job.request), kept)

    # -- deciding and dialling ------------------------------------------------

    def _decide(self, job: Job, d: defer.Deferred[Verdict], kept: Optional[Leg]) -> None:
        state = self._state = Deciding(job, d, kept)
        self.expect(d, lambda verdict: self._verdict(job, verdict, state.takeKept()), self._failed)

    def _verdict(self, job: Job, verdict: Verdict, kept: Optional[Leg]) -> None:
        """Go on with C{job} as C{verdict} says, on C{kept} when it fits."""
        job.verdict = verdict
        factory = self.factory
        protocol = job.request.protocol
        if not verdict.allowed:
            self._blocked(job, verdict, kept)
            return
        self.noteVerdict(verdict)
        if verdict.intercept and factory.mitm is None:
            # The policy asked for interception that this listener cannot do.
            if kept is not None:
                kept.drop()
            _log.error("refusing an intercepted CONNECT to {host}: no MITM configured", host=escape(verdict.host))
            self.abort("error")
            return
        job.head = factory.secrets.substitute(verdict, job.head) if factory.secrets else job.head
        tls = self._tunnel.host if self._tunnel else verdict.host if protocol is Proto.HTTPS else None
        if tls is not None and factory.origin_tls is None:
            self._failure(job, Reason.UPSTREAM_TLS_FAILED, "no trust store for TLS to the destination", kept)
            return
        # TLS targets (CONNECT, and the upstream leg of an intercepted
        # tunnel) reach a parent proxy through a chained CONNECT.
        route = factory.upstream.route(verdict, tunnel=protocol in (Proto.HTTPS_CONNECT, Proto.HTTPS))
        if protocol is not Proto.HTTPS_CONNECT:
            key = (route, tls, job.request.client_identity)
            leg = factory.legs.legFor(key, kept, job.head.framing is _httpbody.NO_BODY, self)
            if leg is not None:
                self._exchange(job, leg, reused=True)
                return
        elif kept is not None:
            kept.release()
        self._dial(job, route, tls)

    def _dial(self, job: Job, route: Route, tls: Optional[str]) -> None:
        d = self.factory.upstream.dial(route)
        self._state = Dialling(job, d, route, tls)
        self.expect(d, self._connected, self._failed)

    def _failed(self, failure: Failure) -> None:
        failure.trap(errors.UpstreamError)
        state = self._state
        assert isinstance(state, (Deciding, Dialling))
        kept = state.takeKept() if isinstance(state, Deciding) else None
        e = failure.value
        assert isinstance(e, errors.UpstreamError)
        self._failure(state.job, e.reason, e.message, kept, e.upstream_status)

    def _connected(self, out: Outbound) -> None:
        state = self._state
        assert isinstance(state, Dialling)
        job, verdict = state.job, state.job.verdict
        assert verdict is not None
        tune(out.transport)
        if job.request.protocol is Proto.HTTPS_CONNECT and verdict.intercept:
            self._intercept(verdict, out, state.route)
        elif job.request.protocol is Proto.HTTPS_CONNECT:
            self.transport.write(_CONNECT_OK)
            self._relayTo(out, out.early)
        else:
            if state.tls is not None:
                assert self.factory.origin_tls is not None
                out.transport.startTLS(self.factory.origin_tls.client_tls(state.tls))
            leg = Leg(out, state.route, state.tls, self, job.request.client_identity, self.factory.legs)
            self._exchange(job, leg, reused=False)

    def _relayTo(self, out: Outbound, fromServer: bytes) -> None:
        self._parser.forget()
        self._state = Tunnelling()
        self.joinRelay(out, self.factory.tunnel_idle, fromServer, self.takePending(), self.clientEOF, self._timer)

    def _intercept(self, verdict: Verdict, out: Outbound, route: Route) -> None:
        """
        Answer C{200}, terminate the client's TLS with a leaf for the
        tunnel's host, wrap the dialled leg in client TLS, and read inner
        requests.
        """
        factory = self.factory
        assert factory.mitm is not None and factory.origin_tls is not None
        self._tunnel = verdict
        out.transport.startTLS(factory.origin_tls.client_tls(verdict.host))
        leg = Leg(out, route, verdict.host, self, self.identity, factory.legs)
        self.transport.write(self.tunnelAnswer)
        # Bytes that came with the CONNECT belong to the TLS handshake: they
        # go to the TLS layer startTLS puts under this protocol.
        handshake = self.takePending()
        self.transport.startTLS(factory.mitm.server_tls(verdict.host))
        self._readHead(leg)
        if handshake:
            # startTLS put a TLS protocol between the transport and us.
            getattr(self.transport, "protocol").dataReceived(handshake)

    # -- exchanges --------------------------------------------------------------

    def _exchange(self, job: Job, leg: Leg, reused: bool) -> None:
        factory = self.factory
        exchange = Exchange(
            self,
            self.transport,
            leg,
            job.head,
            job.request,
            limits=factory.head_limits,
            clock=factory.clock,
            timer=self._timer,
            timeout=factory.response_timeout,
            reused=reused,
            close=job.close,
        )
        self._state = Exchanging(job, exchange)
        exchange.start(factory.via)
        pending = self.takePending()
        if pending and exchange.wantsBody:
            pending = exchange.fromClient(pending)
        if pending:
            self.keep(pending)

    def failed(self, reason: Reason, message: str) -> None:
        state = self._state
        assert isinstance(state, Exchanging)
        self._failure(state.job, reason, message, None)

    def broken(self) -> None:
        self.abort("failed")

    def upgraded(self, out: Outbound, rest: bytes) -> None:
        self._relayTo(out, rest)

    def retry(self, leg: Leg) -> None:
        state = self._state
        assert isinstance(state, Exchanging)
        self._dial(state.job, leg.route, leg.tls)

    def badRequest(self, error: errors.ProtocolError) -> None:
        state = self._state
        assert isinstance(state, Exchanging)
        self.refuseHead(state.job.head, error)

    # -- replies of our own -------------------------------------------------------

    def _blocked(self, job: Job, verdict: Verdict, kept: Optional[Leg]) -> None:
        assert verdict.reason is not None
        self.noteVerdict(verdict)
        self._reply(job.head, job.close, errors.reply_for(verdict.reason), errors.blocked_fields(verdict), kept)

    def _failure(
        self, job: Job, reason: Reason, message: str, kept: Optional[Leg], upstream_status: Optional[int] = None
    ) -> None:
        self.noteEnd("failed", reason.value)
        fields = errors.failure_fields(reason, message, job.request, upstream_status)
        self._reply(job.head, job.close, errors.reply_for(reason), fields, kept)

    def refuseHead(self, head: Optional[_httphead.RequestHead], e: errors.ProtocolError) -> None:
        """
        Answer a request that breaks the wire format (C{head} when it was
        complete), and close.
        """
        self.noteEnd("bad_request")
        reply = attrs.evolve(errors.BAD_REQUEST, status=e.status)
        self._reply(head, True, reply, errors.bad_request_fields(e), None)

    def _reply(
        self,
        head: Optional[_httphead.RequestHead],
        close: bool,
        reply: errors.Reply,
        fields: dict[str, Any],
        kept: Optional[Leg],
    ) -> None:
        """
        Answer the current request ourselves. The connection stays open only
        when the request had no body we would have to skip, and was no CONNECT.
        """
        keep = not close and head is not None and head.framing is _httpbody.NO_BODY and head.form != "authority"
        with_body = head is None or head.method != "HEAD"
        self.transport.write(errors.render(reply.status, reply.header, fields, keep_alive=keep, with_body=with_body))
        self.done(kept, close=not keep)

    def done(self, leg: Optional[Leg], close: bool) -> None:
        """
        The request is answered (by the destination or by us): read the
        next one on C{leg}, or close.
        """
        if not close:
            self._readHead(leg)
        else:
            if leg is not None:
                leg.release()
            self.close()
