"""
What every client connection shares, whichever listener accepted it:
admission against C{limits.max_connections}, the client's address, a read
gate, client bytes kept for later, back-pressure on the connection's own
replies, pending work that a departing client cancels, internal-error
handling, joining a L{Relay}, and the one outcome event per connection
(L{codex_proxy.connections.ConnectionOutcome}).

A listener's protocol derives from L{ClientConnection}, names itself in
C{listener}, and implements L{ClientConnection.abandon}: release what its
current state holds (a pending Deferred, a timer, an outbound leg).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Set, TypeVar

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy._httptarget import authority
from codex_proxy.connections import ConnectionOutcome
from codex_proxy.errors import UpstreamError
from codex_proxy.model import Verdict
from codex_proxy.relay import Relay
from codex_proxy.upstream import IProxyTransport, Outbound

_log = Logger()
T = TypeVar("T")

#: Client bytes kept while a request is decided or served before reading
#: pauses. Reading is not paused per request: that costs two epoll calls
#: per request, and a client that does not pipeline sends nothing meanwhile.
PENDING_LIMIT = 1 << 16


def no_delay(transport: Any) -> None:
    """
    Turn Nagle off: a proxy forwards what it has at once, and a response
    head and body written separately must not wait for a delayed ACK.
    """
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        setNoDelay(True)


class ClientConnection(Protocol):
    """
    One client connection of a listener. The factory provides
    C{connections} (a L{codex_proxy.connections.Connections}) and C{clock}.

    @cvar listener: the listener's name in the outcome event.
    @ivar admitted: within C{max_connections}; when not, the listener
        refuses the first request (with its audit event) and closes.
    @ivar client: the client's C{ip:port}, or C{None}.
    @ivar closing: the connection is being closed, by either side: pending
        work that still fires is ignored.
    @ivar relay: the relay once the connection has become a tunnel.
    @ivar bytesUp: bytes forwarded client to destination outside a relay.
    @ivar bytesDown: bytes forwarded destination to client outside a relay.
    @ivar pending: client bytes kept for later (L{keep}).
    @ivar clientEOF: the client has half-closed its side.
    """

    listener = "client"
    factory: Any
    transport: IProxyTransport

    def connectionMade(self) -> None:
        self.admitted = self.factory.connections.admit(self.transport, self.listener)
        self.closing = False
        self.relay: Optional[Relay] = None
        self.bytesUp = 0
        self.bytesDown = 0
        self.pending = b""
        self.clientEOF = False
        self._paused: Set[str] = set()
        self._writeGate = _WriteGate(self)
        self._producer: Optional[IPushProducer] = None
        self._started = self.factory.clock.seconds()
        self._decision: Optional[str] = None
        self._reason: Optional[str] = None
        self._outcome = "closed"
        peer = self.transport.getPeer()
        is_ip = isinstance(peer, (IPv4Address, IPv6Address))
        self.client = authority(peer.host, peer.port) if is_ip else None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closing = True
        self.abandon()
        up, down = self.bytesUp, self.bytesDown
        if self.relay is not None:
            self.relay.clientLost()
            up, down = up + self.relay.bytesUp, down + self.relay.bytesDown
        self.factory.connections.closed(
            self.transport,
            ConnectionOutcome(
                listener=self.listener,
                client=self.client,
                decision=self._decision,
                reason=self._reason,
                outcome=self._outcome,
                bytes_up=up,
                bytes_down=down,
                duration=self.factory.clock.seconds() - self._started,
                tunnel=self.relay is not None,
            ),
        )

    def writeConnectionLost(self) -> None:
        """
        Our side toward the client was half-closed (a relayed EOF): nothing
        more to do; C{connectionLost} follows when both sides are done.
        """

    def abandon(self) -> None:
        """
        Release what the current state holds: cancel its pending Deferred,
        stop its timer, close its outbound leg. Called when the connection
        closes or aborts; must be idempotent.
        """
        raise NotImplementedError

    # -- outcome ----------------------------------------------------------

    def noteVerdict(self, verdict: Verdict) -> None:
        """
        Remember the latest decision for the outcome event.
        """
        self._decision = verdict.decision.value
        self._reason = verdict.reason.value if verdict.reason is not None else None
        self._outcome = "closed" if verdict.allowed else "blocked"

    def noteEnd(self, outcome: str, reason: Optional[str] = None) -> None:
        """
        Remember how the connection is ending (C{outcome} as in
        L{ConnectionOutcome}), and why, when there is a reason.
        """
        self._outcome = outcome
        if reason is not None:
            self._reason = reason

    # -- read gate --------------------------------------------------------

    def pauseReading(self, why: str) -> None:
        """
        Stop reading the client for C{why}; reading resumes once every
        reason is gone, so independent reasons never undo each other.
        """
        if not self._paused:
            self.transport.pauseProducing()
        self._paused.add(why)

    def resumeReading(self, why: str) -> None:
        if why not in self._paused:
            return
        self._paused.discard(why)
        if not self._paused and not self.closing:
            self.transport.resumeProducing()

    def readingPaused(self, why: str) -> bool:
        return why in self._paused

    def keep(self, data: bytes) -> None:
        """
        Keep client bytes that arrived while a request is decided or served
        (its body, the next request); past L{PENDING_LIMIT}, reading pauses.
        """
        self.pending += data
        if len(self.pending) >= PENDING_LIMIT:
            self.pauseReading("pending")

    def takePending(self) -> bytes:
        """
        The bytes kept so far, which are no longer held against the bound.
        """
        data, self.pending = self.pending, b""
        self.resumeReading("pending")
        return data

    def watchWrites(self) -> None:
        """
        Count what the connection writes itself against back-pressure: a
        gate becomes the client transport's producer, and reading pauses
        while the transport's write buffer is above its high-water mark;
        L{writesDrained} runs once it is below again. A relay or exchange
        registers its own producer while it runs: call this again after.
        """
        self.produce(self._writeGate)

    def produce(self, producer: Optional[IPushProducer]) -> None:
        """
        Make C{producer} the client transport's (streaming) producer, in
        place of the one before; C{None} for none.
        """
        if producer is self._producer:
            return
        if self._producer is self._writeGate:
            # An unregistered gate can no longer resume what it paused.
            self.resumeReading("write")
        if self._producer is not None:
            self.transport.unregisterProducer()
        self._producer = producer
        if producer is not None:
            self.transport.registerProducer(producer, True)

    def writesDrained(self) -> None:
        """
        The client read what was written: override to go on with work held
        back meanwhile.
        """

    # -- pending work and endings -------------------------------------------

    def expect(
        self,
        d: "defer.Deferred[T]",
        callback: Callable[[T], None],
        errback: Callable[[Failure], None],
    ) -> None:
        """
        Run C{callback} or C{errback} when C{d} fires, unless the connection
        is closing by then (a cancelled or failed attempt then needs no
        answer); anything they raise is an internal error.
        """

        def fired(result: T) -> None:
            if not self.closing:
                callback(result)

        def failed(failure: Failure) -> Optional[Failure]:
            if not self.closing:
                errback(failure)
            elif not failure.check(defer.CancelledError, UpstreamError):
                return failure  # a bug, whenever it shows
            return None

        d.addCallbacks(fired, failed)
        d.addErrback(self.internalError)

    def internalError(self, failure: Failure) -> None:
        """
        A bug: log it, and abort the connection (no half-done reply can be
        trusted).
        """
        _log.failure(f"internal error on a {self.listener} client connection", failure)
        if not self.closing:
            self.abort("error")

    def close(self) -> None:
        """
        Close after what is written has been sent.
        """
        self.closing = True
        self.abandon()
        self.transport.loseConnection()

    def abort(self, outcome: str) -> None:
        """
        Drop the connection now, discarding what is unsent.
        """
        self.noteEnd(outcome)
        self.closing = True
        self.abandon()
        self.transport.abortConnection()

    def joinRelay(
        self,
        out: Outbound,
        idle_timeout: float,
        fromServer: bytes = b"",
        fromClient: bytes = b"",
        clientEOF: bool = False,
    ) -> Relay:
        """
        Become a byte tunnel between the client and C{out}: first relay
        C{fromServer} (bytes the destination already sent) and
        C{fromClient} (bytes the client pipelined), then pass on a
        half-close the client already made.
        """
        self.produce(None)
        relay = self.relay = Relay(self.transport, out.transport, self.factory.clock, idle_timeout)
        # The relay made the destination the client transport's producer.
        self._producer = out.transport
        out.attach(relay)
        self.factory.connections.tunnelled(self.listener)
        self._paused.clear()
        self.transport.resumeProducing()
        if fromServer:
            relay.outboundData(fromServer)
        if fromClient:
            relay.fromClient(fromClient)
        if clientEOF:
            relay.clientEOF()
        return relay


@implementer(IPushProducer)
class _WriteGate:
    """
    The client transport's producer between relays and exchanges (see
    L{ClientConnection.watchWrites}).
    """

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:
        self._connection.pauseReading("write")

    def resumeProducing(self) -> None:
        self._connection.resumeReading("write")
        self._connection.writesDrained()

    def stopProducing(self) -> None:
        pass
