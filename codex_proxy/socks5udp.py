"""
The UDP relay of one SOCKS5 UDP ASSOCIATE (RFC 1928 §7, SPEC §6a).

The client talks to a socket bound on the listener's IP; datagrams go out
through a wildcard socket per address family, so a loopback listener can
still reach public destinations. Each new destination of an association is
decided once by the policy service (one audit event per decision) and the
verdict is kept while the policy generation lasts: later datagrams to an
allowed destination go to its first vetted address, datagrams to a denied
one are dropped and counted. After a reload the next datagram to each
destination is decided again (SPEC §6a). Datagrams arriving while the
decision is pending wait in a short queue. Replies are accepted only from
the vetted addresses the client has sent to under their current verdict.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from codex_proxy import _socks5wire as wire
from codex_proxy.errors import ProtocolError, UpstreamError
from codex_proxy.model import Protocol as Proto, ProxyRequest, Verdict
from codex_proxy.policyservice import PolicyService

_log = Logger()

#: Distinct destinations one association may address; datagrams to further
#: ones are dropped, so a client cannot grow the verdict cache without end.
MAX_DESTINATIONS = 1024
#: Datagrams kept per destination while its decision is pending.
MAX_QUEUED = 16
#: The largest datagram a socket reads (the IPv4 UDP maximum, rounded up).
MAX_DATAGRAM = 65535

Address = Tuple[str, int]


class _Destination:
    """
    One destination of an association, decided under the policy
    C{generation}: pending (C{queue} holds datagrams) or decided (C{target}
    is the vetted address to send to, C{None} when denied).
    """

    __slots__ = ("generation", "queue", "target", "work")

    def __init__(self, generation: int, queue: List[bytes]) -> None:
        self.generation = generation
        self.queue: Optional[List[bytes]] = queue
        self.target: Optional[Address] = None
        self.work: Optional[defer.Deferred[Verdict]] = None


class _ClientSide(DatagramProtocol):
    def __init__(self, association: "UDPAssociation") -> None:
        self._association = association

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self._association.fromClient(data, addr[0], addr[1])


class _DestinationSide(DatagramProtocol):
    def __init__(self, association: "UDPAssociation") -> None:
        self._association = association

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self._association.fromDestination(data, addr[0], addr[1])


class UDPAssociation:
    """
    The relay of one association; it lives as long as the TCP control
    connection that created it (the owner calls L{close}).

    @ivar dropped: datagrams dropped (foreign source, bad header, fragment,
        denied or undecidable destination, queue or cache full, send error).
    @ivar bytesUp: payload bytes sent on to destinations.
    @ivar bytesDown: payload bytes of replies sent on to the client.
    """

    bytesUp = 0
    bytesDown = 0

    def __init__(
        self,
        reactor: IReactorUDP,
        policy: PolicyService,
        *,
        client_ip: str,
        client_port: int,
        listen_ip: str,
        client: Optional[str],
        identity: Optional[str],
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._clientIP = client_ip
        # The port the client declared, or None until it sends (declared 0).
        self._clientPort: Optional[int] = client_port or None
        self._listenIP = listen_ip
        self._client = client
        self._identity = identity
        self._clientSide: Any = None
        self._outbound: Dict[int, Any] = {}
        self._destinations: Dict[Address, _Destination] = {}
        self._replyFrom: Set[Address] = set()
        self._closed = False
        self.dropped = 0

    def start(self) -> int:
        """
        Bind the client-facing socket on the listener's IP; return its port.

        @raise twisted.internet.error.CannotListenError: binding failed.
        """
        self._clientSide = self._reactor.listenUDP(
            0, _ClientSide(self), interface=self._listenIP, maxPacketSize=MAX_DATAGRAM
        )
        port: int = self._clientSide.getHost().port
        return port

    def close(self) -> None:
        """
        Stop relaying: close every socket and cancel pending decisions.
        """
        if self._closed:
            return
        self._closed = True
        destinations, self._destinations = self._destinations, {}
        for destination in destinations.values():
            if destination.work is not None:
                destination.work.cancel()
        ports = [self._clientSide, *self._outbound.values()]
        self._outbound = {}
        for port in ports:
            if port is not None:
                port.stopListening()

    # -- client to destination ---------------------------------------------

    def fromClient(self, data: bytes, ip: str, port: int) -> None:
        if ip != self._clientIP:
            self.dropped += 1
            return
        if self._clientPort is None:
            self._clientPort = port
        elif port != self._clientPort:
            self.dropped += 1
            return
        try:
            datagram = wire.parse_datagram(data)
        except ProtocolError:
            self.dropped += 1
            return
        if datagram.frag:
            self.dropped += 1
            return
        key = (datagram.host, datagram.port)
        destination = self._destinations.get(key)
        if destination is None:
            if len(self._destinations) >= MAX_DESTINATIONS:
                self.dropped += 1
                return
            destination = self._decide(key, [])
        elif destination.generation != self._policy.generation:
            destination = self._decide(key, self._supersede(destination))
        if destination.queue is None:
            self._send(destination.target, datagram.payload)
        elif len(destination.queue) < MAX_QUEUED:
            destination.queue.append(datagram.payload)
        else:
            self.dropped += 1

    def _supersede(self, stale: _Destination) -> List[bytes]:
        """
        Retire the verdict of an earlier policy generation: abandon its
        pending decision (nothing was decided, so nothing is audited), stop
        taking replies from its target, and hand back the datagrams it held
        for the new decision.
        """
        queue, stale.queue = stale.queue or [], None
        if stale.work is not None:
            stale.work.cancel()
        if stale.target is not None:
            self._replyFrom.discard(stale.target)
        return queue

    def _decide(self, key: Address, queue: List[bytes]) -> _Destination:
        destination = _Destination(self._policy.generation, queue)
        self._destinations[key] = destination
        request = ProxyRequest(
            protocol=Proto.SOCKS5_UDP,
            host=key[0],
            port=key[1],
            client=self._client,
            command=self._identity,
            client_identity=self._identity,
        )
        d = self._policy.check(request)
        destination.work = d
        d.addCallbacks(
            lambda verdict: self._decided(destination, verdict),
            lambda failure: self._undecidable(destination, failure),
        )
        d.addErrback(self._internalError)
        return destination

    def _decided(self, destination: _Destination, verdict: Verdict) -> None:
        destination.work = None
        if verdict.allowed and verdict.addresses:
            destination.target = (str(verdict.addresses[0]), verdict.port)
        queue, destination.queue = destination.queue or [], None
        for payload in queue:
            self._send(destination.target, payload)

    def _undecidable(self, destination: _Destination, failure: Failure) -> None:
        destination.work = None
        if failure.check(defer.CancelledError):
            # Closed, or superseded by a decision under a newer policy.
            return
        # A DNS failure was audited by the policy service: deny, like a block.
        failure.trap(UpstreamError)
        self.dropped += len(destination.queue or ())
        destination.queue = None

    def _send(self, target: Optional[Address], payload: bytes) -> None:
        if target is None or self._closed:
            self.dropped += 1
            return
        family = 6 if ":" in target[0] else 4
        port: Any = self._outbound.get(family)
        try:
            if port is None:
                port = self._reactor.listenUDP(
                    0,
                    _DestinationSide(self),
                    interface="::" if family == 6 else "0.0.0.0",
                    maxPacketSize=MAX_DATAGRAM,
                )
                self._outbound[family] = port
            self._replyFrom.add(target)
            port.write(payload, target)
        except (OSError, error.CannotListenError, error.MessageLengthError):
            self.dropped += 1
        else:
            self.bytesUp += len(payload)

    # -- destination to client ---------------------------------------------

    def fromDestination(self, data: bytes, ip: str, port: int) -> None:
        if (ip, port) not in self._replyFrom or self._clientPort is None:
            self.dropped += 1
            return
        try:
            self._clientSide.write(
                wire.encode_datagram(ip, port, data), (self._clientIP, self._clientPort)
            )
        except (OSError, error.MessageLengthError):
            self.dropped += 1
        else:
            self.bytesDown += len(data)

    def _internalError(self, failure: Failure) -> None:
        _log.failure("internal error relaying a SOCKS5 UDP datagram", failure)
