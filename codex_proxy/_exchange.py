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

from typing import List, Optional

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure
from zope.interface import Attribute, implementer

from codex_proxy import _httpbody, _httphead
from codex_proxy._httpfields import Headers
from codex_proxy._httptarget import forwarded_response_head, is_websocket_upgrade, outgoing_head
from codex_proxy._legs import ILegOwner, Leg
from codex_proxy.addresses import authority
from codex_proxy.errors import ProtocolError
from codex_proxy.mitm import is_tls_failure
from codex_proxy.model import ProxyRequest, Reason
from codex_proxy.relay import IdleWatch, Timer
from codex_proxy.upstream import IProxyTransport, ISink, Outbound


class IExchangeOwner(ILegOwner):
    """
    The client connection an L{Exchange} reports to.
    """

    bytesUp = Attribute("Bytes forwarded client to destination; the exchange adds to it.")
    bytesDown = Attribute("Bytes forwarded destination to client; the exchange adds to it.")

    def produce(producer: Optional[IPushProducer]) -> None:
        """Make C{producer} the client transport's producer."""

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
