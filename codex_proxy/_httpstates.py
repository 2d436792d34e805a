"""
The states of an HTTP client connection (the table is in
L{codex_proxy.httpproxy}): each holds what may be pending in it and releases
exactly that. L{ReadingHead} parses the next request head from what the
client sent, pipelined heads included, under the keep-alive idle and header
timeouts.

Bytes the client pipelined behind a request are parsed in a later reactor
turn (C{callLater(0)}), never from inside the reply to the previous one: a
thousand blocked requests in one read are a thousand turns, not a thousand
nested calls. And they wait while the client's write buffer is above its
high-water mark, so replies the proxy writes itself are bounded like
forwarded data.
"""

from __future__ import annotations

from typing import Optional, Union

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Attribute, Interface

from codex_proxy import _httphead
from codex_proxy._exchange import Exchange
from codex_proxy._legs import Leg
from codex_proxy.errors import ProtocolError
from codex_proxy.model import ProxyRequest, Verdict
from codex_proxy.relay import Timer
from codex_proxy.upstream import Outbound, Route


class IHeadOwner(Interface):
    """
    The client connection a L{ReadingHead} reads for (a
    L{codex_proxy._connection.ClientConnection}).
    """

    pending = Attribute("Client bytes kept, not yet parsed.")
    clientEOF = Attribute("The client has half-closed.")

    def keep(data: bytes) -> None:
        """Keep client bytes for later."""

    def takePending() -> bytes:
        """Take the kept bytes."""

    def readingPaused(why: str) -> bool:
        """Whether reading is paused for C{why} (C{"write"}: the client's buffer is full)."""

    def close() -> None:
        """Close the connection."""

    def refuseHead(head: Optional[_httphead.RequestHead], error: ProtocolError) -> None:
        """Answer a request that breaks the wire format, and close."""

    def headArrived(head: _httphead.RequestHead, kept: Optional[Leg]) -> None:
        """A complete head: decide it; C{kept} is the kept-alive leg, if any."""


class ReadingHead:
    """
    Waiting for a request head. Arms the connection's timer (the idle
    limit, or the header timeout once a head is left incomplete), holds the
    step that parses kept bytes from the reactor, and the destination leg
    kept alive for the next request.

    @ivar idle: between requests (the idle timer runs, not the header one).
    """

    def __init__(
        self,
        owner: IHeadOwner,
        parser: _httphead.RequestHeadParser,
        clock: IReactorTime,
        timer: Timer,
        idle_timeout: float,
        header_timeout: float,
        kept: Optional[Leg],
        idle: bool,
    ) -> None:
        self.kept = kept
        self._owner = owner
        self._parser = parser
        self._clock = clock
        self._idleTimeout = idle_timeout
        self._headerTimeout = header_timeout
        self._timer = timer
        self._step: Optional[IDelayedCall] = None
        self._arm(idle and not owner.pending)
        self.stepSoon()

    def fromClient(self, data: bytes) -> None:
        """
        Client bytes: parsed now when nothing is waiting, else kept behind
        what is.
        """
        owner = self._owner
        if self._step or owner.pending or owner.readingPaused("write"):
            owner.keep(data)
            if self.idle:
                self._arm(idle=False)
        else:
            # A head that arrives whole needs no header timer: the idle
            # one stays armed (to be moved on) unless it is left incomplete.
            self._feed(data)

    def stepSoon(self) -> None:
        """
        Parse the kept bytes in a later reactor turn, unless the client's
        write buffer is full.
        """
        owner = self._owner
        if owner.pending and self._step is None and not owner.readingPaused("write"):
            self._step = self._clock.callLater(0, self._stepped)

    def release(self) -> None:
        self._stop()
        kept, self.kept = self.kept, None
        if kept is not None:
            kept.release()

    def _arm(self, idle: bool) -> None:
        """
        Between requests the keep-alive idle limit (close quietly); once a
        head has begun, the header timeout (408).
        """
        self.idle = idle
        if idle:
            self._timer.arm(self._idleTimeout, self._owner.close)
        else:
            self._timer.arm(self._headerTimeout, self._timedOut)

    def _stepped(self) -> None:
        self._step = None
        if not self._owner.readingPaused("write"):
            self._feed(self._owner.takePending())

    def _timedOut(self) -> None:
        seconds = self._headerTimeout
        error = ProtocolError(f"the request head did not arrive within {seconds:g}s", 408)
        self._owner.refuseHead(None, error)

    def _feed(self, data: bytes) -> None:
        owner = self._owner
        try:
            result = self._parser.feed(data)
        except ProtocolError as e:
            owner.refuseHead(None, e)
            return
        if result is None:
            if owner.clientEOF:
                # A head that can now never end.
                owner.close()
            elif self.idle:
                self._arm(idle=False)
            return
        head, rest = result
        owner.keep(rest)
        self._stop()
        kept, self.kept = self.kept, None
        owner.headArrived(head, kept)

    def _stop(self) -> None:
        self._timer.disarm()
        step, self._step = self._step, None
        if step is not None and step.active():
            step.cancel()


@attrs.define
class Job:
    """
    The request being served, whether the connection closes after it, and
    its verdict once decided.
    """

    head: _httphead.RequestHead
    request: ProxyRequest
    close: bool
    verdict: Optional[Verdict] = None


class Deciding:
    """
    The policy is deciding C{job}; holds its Deferred and the kept leg.
    """

    def __init__(self, job: Job, work: defer.Deferred[Verdict], kept: Optional[Leg]) -> None:
        self.job, self.work, self.kept = job, work, kept

    def takeKept(self) -> Optional[Leg]:
        kept, self.kept = self.kept, None
        return kept

    def release(self) -> None:
        self.work.cancel()
        kept = self.takeKept()
        if kept is not None:
            kept.release()


class Dialling:
    """
    Connecting for C{job}; holds the dial's Deferred.
    """

    def __init__(self, job: Job, work: defer.Deferred[Outbound], route: Route, tls: Optional[str]) -> None:
        self.job, self.work, self.route, self.tls = job, work, route, tls

    def release(self) -> None:
        self.work.cancel()


class Exchanging:
    """
    Serving C{job} over an L{Exchange}, which holds the leg and its timer.
    """

    def __init__(self, job: Job, exchange: Exchange) -> None:
        self.job, self.exchange = job, exchange

    def release(self) -> None:
        self.exchange.cancel()


class Tunnelling:
    """A byte tunnel; the relay is the connection's (C{relay})."""

    def release(self) -> None:
        pass


class Closing:
    """Closed, or closing: nothing is pending."""

    def release(self) -> None:
        pass


State = Union[ReadingHead, Deciding, Dialling, Exchanging, Tunnelling, Closing]
CLOSING = Closing()
