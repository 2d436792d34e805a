"""
The open connections of one proxy, client and outbound alike, so that a
shutdown can close every one of them and know when they are gone, so that
client connections beyond C{limits.max_connections} are refused, and so
that every client connection ends with one outcome event.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger

from codex_proxy.audit import emit_structured

_log = Logger()


@attrs.frozen
class ConnectionOutcome:
    """
    How one client connection ended: what metrics count and logs read.

    @ivar listener: C{"http"} or C{"socks5"}.
    @ivar client: the client's C{ip:port}, if known.
    @ivar decision: the last policy decision on this connection
        (C{"allow"}, C{"deny"}, C{"ask"}), or C{None} when none was made.
    @ivar reason: the reason of the last block or failure, or C{None}.
    @ivar outcome: how it ended: C{"closed"} (normally, after its last
        request was allowed), C{"blocked"} (its last request was refused,
        C{max_connections} included), C{"failed"} (the destination failed
        or timed out), C{"bad_request"} (the client broke the protocol or
        timed out sending a head) or C{"error"} (ours).
    @ivar identity: the client that authenticated on it (SPEC §11), or
        C{None}.
    @ivar bytes_up: bytes forwarded client to destination (bodies, tunnel
        bytes and SOCKS5 UDP payloads; heads not counted).
    @ivar bytes_down: bytes forwarded destination to client.
    @ivar duration: seconds from accept to close.
    @ivar tunnel: it became a tunnel (a relay of bytes both ways).
    """

    listener: str
    client: Optional[str]
    decision: Optional[str]
    reason: Optional[str]
    outcome: str
    bytes_up: int
    bytes_down: int
    duration: float
    identity: Optional[str] = None
    tunnel: bool = False


class Connections:
    """
    Transports register when their connection is made and unregister when
    it is lost; L{closeAll} aborts the rest.

    @ivar max_clients: how many client connections (both listeners
        together) L{admit} lets in at once.
    @ivar observers: called with each client connection's
        L{ConnectionOutcome} when it ends (after the log event).
    @ivar max_per_client: how many connections one authenticated client
        (SPEC §11) may hold open at once.

    @ivar open_observers: called with the listener name of each client
        connection accepted (refused ones too: their outcome ends them).
    @ivar tunnel_observers: called with the listener name of each client
        connection that becomes a tunnel.
    """

    def __init__(self, max_clients: int = 4096, max_per_client: int = 1024) -> None:
        self.max_clients = max_clients
        self.max_per_client = max_per_client
        self.observers: List[Callable[[ConnectionOutcome], None]] = []
        self.open_observers: List[Callable[[str], None]] = []
        self.tunnel_observers: List[Callable[[str], None]] = []
        self._open: Set[ITCPTransport] = set()
        self._clients: Set[ITCPTransport] = set()
        self._byIdentity: Dict[str, Set[ITCPTransport]] = {}
        self._identityOf: Dict[ITCPTransport, str] = {}
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

    def admit(self, transport: ITCPTransport, listener: str) -> bool:
        """
        Register a new client connection of C{listener}; C{False} when
        C{max_clients} are already open: the listener then refuses its
        request. A refused connection is still registered (a shutdown
        closes it) but not counted.
        """
        self._open.add(transport)
        for observer in self.open_observers:
            observer(listener)
        if len(self._clients) >= self.max_clients:
            return False
        self._clients.add(transport)
        return True

    def claim(self, transport: ITCPTransport, identity: Optional[str]) -> bool:
        """
        Count the client connection C{transport} as one of C{identity}'s
        (C{None}: anonymous, counted for no client); C{False} when that
        client holds C{max_per_client} connections already (the connection
        is then counted for no client). A connection counts for one client
        at a time.
        """
        held = self._identityOf.get(transport)
        if held == identity:
            return True
        self._release(transport)
        if identity is None:
            return True
        mine = self._byIdentity.setdefault(identity, set())
        if len(mine) >= self.max_per_client:
            return False
        mine.add(transport)
        self._identityOf[transport] = identity
        return True

    def _release(self, transport: ITCPTransport) -> None:
        if not self._identityOf:
            return
        identity = self._identityOf.pop(transport, None)
        if identity is not None:
            mine = self._byIdentity[identity]
            mine.discard(transport)
            if not mine:
                del self._byIdentity[identity]

    def tunnelled(self, listener: str) -> None:
        """
        A client connection of C{listener} became a tunnel.
        """
        for observer in self.tunnel_observers:
            observer(listener)

    def closed(
        self, transport: ITCPTransport, outcome: Optional[ConnectionOutcome] = None
    ) -> None:
        """
        C{transport} is gone; a client connection reports its C{outcome}:
        one structured log event without text (connections are the bulk of
        the traffic; blocks and failures already have their own lines),
        then each observer.
        """
        self._open.discard(transport)
        self._clients.discard(transport)
        self._release(transport)
        if outcome is not None:
            emit_structured(_log, connection=outcome)
            for observer in self.observers:
                observer(outcome)
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

    def closeOutbound(self) -> None:
        """
        Abort every outbound connection (a proxy disabled at run time, SPEC
        §2.5): tunnels close with their server side, in-flight exchanges
        fail, and client connections stay open for their next request.
        """
        for transport in list(self._open - self._clients):
            transport.abortConnection()
