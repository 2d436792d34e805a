"""
The open connections of one proxy, client and outbound alike, so that a
shutdown can close every one of them and know when they are gone, and so
that client connections beyond C{limits.max_connections} are refused.
"""

from __future__ import annotations

from typing import List, Set

from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport


class Connections:
    """
    Transports register when their connection is made and unregister when
    it is lost; L{closeAll} aborts the rest.

    @ivar max_clients: how many client connections (both listeners
        together) L{admit} lets in at once.
    """

    def __init__(self, max_clients: int = 4096) -> None:
        self.max_clients = max_clients
        self._open: Set[ITCPTransport] = set()
        self._clients: Set[ITCPTransport] = set()
        self._waiting: List[defer.Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._open)

    @property
    def clients(self) -> int:
        """
        Client connections admitted and still open.
        """
        return len(self._clients)

    def opened(self, transport: ITCPTransport) -> None:
        self._open.add(transport)

    def admit(self, transport: ITCPTransport) -> bool:
        """
        Register a new client connection; C{False} when C{max_clients} are
        already open: the listener then refuses its request. A refused
        connection is still registered (a shutdown closes it) but not
        counted.
        """
        self._open.add(transport)
        if len(self._clients) >= self.max_clients:
            return False
        self._clients.add(transport)
        return True

    def closed(self, transport: ITCPTransport) -> None:
        self._open.discard(transport)
        self._clients.discard(transport)
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
