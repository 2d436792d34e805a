"""
The open connections of one proxy, client and outbound alike, so that a
shutdown can close every one of them and know when they are gone.
"""

from __future__ import annotations

from typing import List, Set

from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport


class Connections:
    """
    Transports register when their connection is made and unregister when
    it is lost; L{closeAll} aborts the rest.
    """

    def __init__(self) -> None:
        self._open: Set[ITCPTransport] = set()
        self._waiting: List[defer.Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, transport: ITCPTransport) -> None:
        self._open.add(transport)

    def closed(self, transport: ITCPTransport) -> None:
        self._open.discard(transport)
        if not self._open:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def closeAll(self) -> defer.Deferred[None]:
        """
        Abort every open connection (tunnels included: both of their
        sides are here); fires once the last one is lost.
        """
        if not self._open:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        for transport in list(self._open):
            transport.abortConnection()
        return d
