"""
An application end of a real socket in the test reactor: what it reads,
its EOF and its loss, each awaitable.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class End(Protocol):
    """
    @param closeOnEOF: answer the peer's half-close by closing (a server
        that is done), instead of staying half-open.
    """

    def __init__(self, closeOnEOF: bool = False) -> None:
        self.closeOnEOF = closeOnEOF
        self.received = bytearray()
        self.made: defer.Deferred[None] = defer.Deferred()
        self.eof: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._waiting: List[Tuple[int, defer.Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for count, d in list(self._waiting):
            if len(self.received) >= count:
                self._waiting.remove((count, d))
                d.callback(None)

    def until(self, count: int) -> defer.Deferred[None]:
        """
        Fires once C{count} bytes in all were read.
        """
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((count, d))
        self.dataReceived(b"")
        return d

    def readConnectionLost(self) -> None:
        self.eof.callback(None)
        if self.closeOnEOF:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.eof.called:
            self.eof.callback(None)
        self.lost.callback(None)
