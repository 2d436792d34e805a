"""
One plain HTTP request/response exchange over one outbound leg.

The listener hands an L{Exchange} the request head it decided on and a
L{Leg}; the exchange writes the head, streams the request body up and the
response down (each body validated by its reader as it streams, neither
ever held whole), applies back-pressure both ways, and reports to its
owner exactly once how it ended:

    done(leg, close)      the response is complete; C{leg} is kept alive
                          when it may carry the next request
    failed(reason, msg)   nothing was sent to the client yet: answer it
    broken()              the response had begun: cut the client off
    upgraded(out, rest)   a websocket C{101}: the connection is a tunnel now
    retry(leg)            a kept-alive leg closed before answering a
                          body-less request: send it once more, freshly
    badRequest(error)     the client's body broke its framing

Each chunk costs a direct call in each direction: reader, write, counter.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from codex_proxy import _httpbody, _httphead
from codex_proxy._httpfields import Headers
from codex_proxy._httptarget import forwarded_response_head, is_websocket_upgrade, outgoing_head
from codex_proxy.addresses import authority
from codex_proxy.errors import ProtocolError
from codex_proxy.mitm import is_tls_failure
from codex_proxy.model import ProxyRequest, Reason
from codex_proxy.relay import IdleWatch, Timer
from codex_proxy.upstream import IProxyTransport, ISink, Outbound, Route


class IExchangeOwner(Interface):
    """
    The client connection an L{Exchange} reports to.
    """

    bytesUp = Attribute("Bytes forwarded client to destination; the exchange adds to it.")
    bytesDown = Attribute("Bytes forwarded destination to client; the exchange adds to it.")

    def pauseReading(why: str) -> None:
        """Stop reading the client for C{why}."""

    def produce(producer: Optional[IPushProducer]) -> None:
        """Make C{producer} the client transport's producer."""

    def resumeReading(why: str) -> None:
        """C{why} no longer holds client reading back."""

    def done(leg: Optional["Leg"], close: bool) -> None:
        """The response is complete."""

    def failed(reason: Reason, message: str) -> None:
        """The exchange failed before any response byte reached the client."""

    def broken() -> None:
        """The exchange failed after the response began."""

    def upgraded(out: Outbound, rest: bytes) -> None:
        """The destination switched protocols (websocket)."""

    def retry(leg: "Leg") -> None:
        """Send the request again on a fresh connection like C{leg}."""

    def badRequest(error: ProtocolError) -> None:
        """The request body broke its framing before the response began."""


#: What a kept-alive leg may serve: its route, the host its TLS was opened
#: for (or C{None}), and the client identity it was dialled for.
LegKey = Tuple[Route, Optional[str], Optional[str]]


@implementer(ISink, IPushProducer)
class Leg:
    """
    A dialled destination connection that may carry several exchanges.

    Between exchanges it is its own sink: an idle destination that speaks
    or closes is dropped. It is also the producer registered on its own
    transport, so a full destination buffer pauses client reading.

    @ivar route: where it goes; equal routes may share it.
    @ivar tls: the host its TLS was opened for, or C{None}.
    @ivar key: which requests it may serve (L{LegKey}).
    @ivar open: still usable.
    """

    _responses: Optional[_httphead.ResponseHeadParser] = None

    def __init__(
        self,
        out: Outbound,
        route: Route,
        tls: Optional[str],
        owner: IExchangeOwner,
        identity: Optional[str],
        pool: "LegPool",
    ) -> None:
        self.out = out
        self.route = route
        self.tls = tls
        self.key: LegKey = (route, tls, identity)
        self.open = True
        self._dropped = False
        # None while parked in the pool.
        self._owner: Optional[IExchangeOwner] = owner
        self._pool = pool
        out.attach(self)
        out.transport.registerProducer(self, True)

    def responses(self, method: str, limits: _httpbody.HeadLimits) -> _httphead.ResponseHeadParser:
        """
        The parser of the response heads this connection sends, for a
        request of C{method}: one for its life, which reads a field block
        repeated from the last response once.
        """
        parser = self._responses
        if parser is None:
            parser = self._responses = _httphead.ResponseHeadParser(method, limits)
        else:
            parser.answering(method)
        return parser

    def adopt(self, owner: Optional[IExchangeOwner]) -> None:
        """
        Serve C{owner}'s requests from now on (C{None}: parked).
        """
        self._owner = owner

    def release(self) -> None:
        """
        The client connection is done with it: parked in its pool for the
        next request with the same key when it has carried an exchange (so
        its TLS, if any, was verified), or closed.
        """
        if self.open and self._responses is not None:
            self._pool.park(self)
        else:
            self.drop()

    def drop(self) -> None:
        """
        Close the connection; detached first, so bytes it still reads (a
        TLS leg reads on until close_notify) reach no client.
        """
        if self._dropped:
            return
        self._dropped = True
        self.open = False
        self.out.detach()
        self.out.transport.loseConnection()
        owner = self._owner
        if owner is not None:
            # Its back-pressure on the client ends with it.
            owner.resumeReading("upstream")
        else:
            self._pool.forget(self)

    def outboundData(self, data: bytes) -> None:
        self.drop()

    def outboundEOF(self) -> None:
        self.drop()

    def outboundLost(self, reason: Failure) -> None:
        self.open = False
        if self._owner is None:
            self.drop()

    def pauseProducing(self) -> None:
        if self._owner is not None:
            self._owner.pauseReading("upstream")

    def resumeProducing(self) -> None:
        if self._owner is not None:
            self._owner.resumeReading("upstream")

    def stopProducing(self) -> None:
        pass


class LegPool:
    """
    Destination connections kept alive between client connections, as
    Squid keeps its server connections: a request on a new client
    connection is sent on an idle leg with the same key instead of a new
    dial. Only body-less requests take a parked leg, so one the
    destination closed meanwhile costs a resend on a fresh dial
    (L{IExchangeOwner.retry}), never the request. The key holds the client
    identity: clients that authenticate differently never share a
    connection.

    @param idle: seconds a leg stays parked; shorter than the 5 s servers
        such as Node.js keep an idle connection, so a parked leg is seldom
        one its server is closing.
    @param per_key: parked legs kept per key.
    @param total: parked legs kept in all.
    """

    def __init__(self, clock: IReactorTime, idle: float = 4.0, per_key: int = 16, total: int = 256) -> None:
        self._clock = clock
        self._idle = idle
        self._perKey = per_key
        self._total = total
        self._parked: Dict[LegKey, List[Leg]] = {}
        self._expiry: Dict[Leg, IDelayedCall] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def park(self, leg: Leg) -> None:
        """
        Keep C{leg} for the next request with its key, until it idles out;
        closed when the pool is full.
        """
        legs = self._parked.setdefault(leg.key, [])
        if len(legs) >= self._perKey or len(self._expiry) >= self._total:
            if not legs:
                del self._parked[leg.key]
            leg.drop()
            return
        leg.adopt(None)
        # Read, so that a destination that speaks or closes while the leg is
        # parked drops it (the last client may have paused it).
        leg.out.transport.resumeProducing()
        legs.append(leg)
        self._expiry[leg] = self._clock.callLater(self._idle, leg.drop)

    def take(self, key: LegKey, owner: IExchangeOwner) -> Optional[Leg]:
        """
        The leg parked last with C{key}, now serving C{owner}; C{None}: none.
        """
        legs = self._parked.get(key)
        if not legs:
            return None
        leg = legs.pop()
        if not legs:
            del self._parked[key]
        self._expiry.pop(leg).cancel()
        leg.adopt(owner)
        return leg

    def forget(self, leg: Leg) -> None:
        """
        C{leg} closed while parked: no longer offered.
        """
        expiry = self._expiry.pop(leg)
        if expiry.active():
            expiry.cancel()
        legs = self._parked[leg.key]
        legs.remove(leg)
        if not legs:
            del self._parked[leg.key]

    def clear(self) -> None:
        """
        Close every parked leg.
        """
        for leg in list(self._expiry):
            leg.drop()


@implementer(ISink)
class Exchange:
    """
    One request and its response; the sink of the leg while it runs.

    @ivar close: the client connection closes after this response.
    """

    def __init__(
        self,
        owner: IExchangeOwner,
        client: IProxyTransport,
        leg: Leg,
        head: _httphead.RequestHead,
        request: ProxyRequest,
        *,
        limits: _httpbody.HeadLimits,
        clock: IReactorTime,
        timer: Timer,
        timeout: float,
        reused: bool,
        close: bool,
    ) -> None:
        self._owner = owner
        self._client = client
        self._leg = leg
        self._head = head
        self._request = request
        self._limits = limits
        self._timeout = timeout
        self._reused = reused
        self.close = close
        self._ended = False
        self._respStarted = False
        self._respKeepAlive = False
        self._respParser = leg.responses(head.method, limits)
        self._respReader: Optional[_httpbody.BodyReader] = None
        self._reqReader = _httpbody.body_reader(head.framing, limits)
        # Response heads received: progress for the timeout, like body bytes.
        self._heads = 0
        self._watch = IdleWatch(clock, timeout, self._moved, self._timedOut, timer)

    def start(self, via: bytes) -> None:
        """
        Forward the request head, with our C{via}; the destination becomes
        the producer of the client transport (a slow client pauses it).
        """
        out = self._leg.out
        route = self._leg.route
        out.attach(self)
        out.transport.write(
            outgoing_head(
                self._head,
                self._request,
                via,
                parent_authorization=route.parent.authorization if route.parent else None,
                absolute_form=route.absolute_form,
            ),
        )
        self._owner.produce(out.transport)

    @property
    def wantsBody(self) -> bool:
        """
        The request body is still arriving.
        """
        return self._reqReader is not None

    def _moved(self) -> int:
        moved: int = self._owner.bytesUp + self._owner.bytesDown + self._heads
        return moved

    # -- the request body -------------------------------------------------

    def fromClient(self, data: bytes) -> bytes:
        """
        Body bytes from the client; returns the bytes after the body.
        """
        assert self._reqReader is not None
        try:
            chunk, done, rest = self._reqReader.feed(data)
        except ProtocolError as e:
            self._end()
            self._leg.drop()
            if self._respStarted:
                self._owner.broken()
            else:
                self._owner.badRequest(e)
            return b""
        if chunk:
            self._owner.bytesUp += len(chunk)
            self._leg.out.transport.write(chunk)
        if done:
            self._reqReader = None
            return rest
        return b""

    # -- the response -----------------------------------------------------

    def outboundData(self, data: bytes) -> None:
        # A response head goes out with the body bytes that came with it,
        # in one write.
        out: List[bytes] = []
        while self._respReader is None:
            try:
                result = self._respParser.feed(data)
            except ProtocolError as e:
                self._upstreamBroken(e.message)
                return
            if result is None:
                return
            head, data = result
            self._heads += 1
            self._respStarted = True
            if head.status == 101:
                self._switchProtocols(head, data)
                return
            if head.status < 200:
                self._interim(head)
                continue
            out.append(self._startResponse(head))
            if self._respReader is None:
                self._client.write(out[0])
                self._responseDone(data, reusable=head.keep_alive)
                return
        if data:
            try:
                chunk, done, rest = self._respReader.feed(data)
            except ProtocolError as e:
                if out:
                    self._client.write(out[0])
                self._upstreamBroken(e.message)
                return
        else:
            chunk, done, rest = b"", False, b""
        if chunk:
            self._owner.bytesDown += len(chunk)
            out.append(chunk)
        if out:
            self._client.write(out[0] if len(out) == 1 else b"".join(out))
        if done:
            self._responseDone(rest, reusable=self._respKeepAlive)

    def _interim(self, head: _httphead.ResponseHead) -> None:
        """
        Interim responses (100 Continue) go to HTTP/1.1 clients only.
        """
        if self._head.version >= (1, 1):
            self._client.write(forwarded_response_head(head))

    def _switchProtocols(self, head: _httphead.ResponseHead, rest: bytes) -> None:
        """
        A C{101} answer: accepted only for a websocket upgrade we forwarded,
        after which the connection is a tunnel both ways.
        """
        upgrade = head.header(b"upgrade")
        if not is_websocket_upgrade(self._head) or upgrade is None:
            self._respStarted = False
            self._upstreamBroken("unexpected 101 Switching Protocols")
            return
        self._client.write(
            forwarded_response_head(head, ((b"Connection", b"Upgrade"), (b"Upgrade", upgrade)))
        )
        self._end()
        # The relay registers its own producers on both sides.
        self._leg.out.transport.unregisterProducer()
        self._owner.upgraded(self._leg.out, rest)

    def _startResponse(self, head: _httphead.ResponseHead) -> bytes:
        """
        The response head to send; sets the body reader, if a body follows.
        """
        added: Headers = ()
        framing = head.framing
        old_client = self._head.version < (1, 1)
        if framing is _httpbody.CHUNKED and not old_client:
            added += ((b"Transfer-Encoding", b"chunked"),)
        elif framing is _httpbody.CHUNKED or framing is _httpbody.UNTIL_CLOSE:
            # An HTTP/1.0 client gets the chunked payload decoded, delimited
            # by the close, like a body that runs until close.
            self.close = True
        reader = _httpbody.body_reader(framing, self._limits, decode_chunked=old_client)
        if self.close:
            added += ((b"Connection", b"close"),)
        elif old_client:
            added += ((b"Connection", b"keep-alive"),)
        self._respKeepAlive = head.keep_alive
        self._respReader = reader
        return forwarded_response_head(head, added)

    def _responseDone(self, rest: bytes, reusable: bool) -> None:
        self._end()
        leg: Optional[Leg] = self._leg
        if rest or not reusable or self._reqReader is not None:
            self._leg.drop()
            leg = None
        else:
            self._leg.out.attach(self._leg)
        if self._reqReader is not None:
            # The destination answered before the whole body was sent (e.g.
            # 413): the client's remaining bytes cannot be resynchronised.
            self.close = True
        self._owner.done(leg, self.close)

    def _upstreamBroken(self, message: str) -> None:
        self._end()
        self._leg.drop()
        if self._respStarted and self._respReader is not None:
            self._owner.broken()
        else:
            self._owner.failed(Reason.UPSTREAM_BAD_RESPONSE, message)

    def outboundEOF(self) -> None:
        self._leg.out.transport.loseConnection()

    def outboundLost(self, reason: Failure) -> None:
        self._leg.open = False
        self._end()
        if isinstance(self._respReader, _httpbody.UntilCloseReader):
            self._owner.done(None, True)
        elif self._respStarted:
            self._owner.broken()
        elif self._leg.tls is not None and is_tls_failure(reason):
            self._owner.failed(
                Reason.UPSTREAM_TLS_FAILED,
                f"TLS with {authority(self._leg.tls, self._request.port)} failed:"
                f" {reason.getErrorMessage()}",
            )
        elif self._reused and self._head.framing is _httpbody.NO_BODY:
            self._owner.retry(self._leg)
        else:
            self._owner.failed(
                Reason.UPSTREAM_BAD_RESPONSE,
                "the destination closed the connection without a response",
            )

    # -- endings ----------------------------------------------------------

    def _timedOut(self) -> None:
        """
        Nothing moved for the response timeout: the destination is dropped;
        a client still waiting for a response head gets 504.
        """
        self._end()
        self._leg.drop()
        if self._respStarted:
            self._owner.broken()
        else:
            self._owner.failed(
                Reason.UPSTREAM_TIMEOUT,
                f"{authority(self._request.host, self._request.port)} sent no response"
                f" within {self._timeout:g}s",
            )

    def _end(self) -> None:
        """
        Stop the response timeout, exactly once, whichever way the exchange
        ends (the owner registers the client transport's next producer).
        """
        if self._ended:
            return
        self._ended = True
        self._watch.stop()

    def cancel(self) -> None:
        """
        The client went away or the owner gave up: drop the leg, unless the
        exchange had ended (its leg is the owner's then).
        """
        if self._ended:
            return
        self._end()
        self._leg.drop()
