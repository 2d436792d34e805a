"""
Destination connections ("legs") that carry plain HTTP exchanges: kept
alive by their client connection between its requests, and parked in a
L{LegPool} between client connections, as Squid keeps its server
connections.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from codex_proxy import _httpbody, _httphead
from codex_proxy.upstream import ISink, Outbound, Route


class ILegOwner(Interface):
    """
    The client connection a leg serves: a full destination buffer holds
    its reading back.
    """

    def pauseReading(why: str) -> None:
        """Stop reading the client for C{why}."""

    def resumeReading(why: str) -> None:
        """C{why} no longer holds client reading back."""


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
        owner: ILegOwner,
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
        self._owner: Optional[ILegOwner] = owner
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

    def adopt(self, owner: Optional[ILegOwner]) -> None:
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
    (L{codex_proxy._exchange.IExchangeOwner.retry}), never the request. The key holds the client
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

    def legFor(self, key: LegKey, kept: Optional[Leg], replayable: bool, owner: ILegOwner) -> Optional[Leg]:
        """
        The leg a request with C{key} goes out on for C{owner}: C{kept}, the
        client connection's own, when it is open and has that key; else,
        for a request that can be sent again (C{replayable}: it has no body,
        and a parked leg may have been closed by now), the leg parked last
        with C{key}, now serving C{owner}. C{None}: dial one. A C{kept} that
        does not fit is released.
        """
        if kept is not None:
            if kept.open and kept.key == key:
                return kept
            kept.release()
        if not replayable:
            return None
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
