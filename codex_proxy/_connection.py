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

import enum
from typing import Any, Callable, FrozenSet, Literal, Optional, TypeVar, Union

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy import splice
from codex_proxy._turnwrites import TURN_WRITES
from codex_proxy._httphead import RequestHead
from codex_proxy._httptarget import came_through
from codex_proxy.addresses import authority
from codex_proxy.connections import ConnectionOutcome
from codex_proxy.errors import UpstreamError
from codex_proxy.model import ProxyRequest, Reason, Verdict
from codex_proxy.relay import Relay, Timer
from codex_proxy.upstream import IProxyTransport, Outbound

_log = Logger()
T = TypeVar("T")

#: Refusals after which a connection closes: it holds a slot over a limit.
OVER_LIMIT = frozenset({Reason.TOO_MANY_CONNECTIONS, Reason.TOO_MANY_CLIENT_CONNECTIONS})

#: Client bytes kept while a request is decided or served before reading
#: pauses. Reading is not paused per request: that costs two epoll calls
#: per request, and a client that does not pipeline sends nothing meanwhile.
PENDING_LIMIT = 1 << 16


class _Noted(enum.Enum):
    #: The outcome or reason is the latest verdict's.
    OF_VERDICT = 0


_OF_VERDICT: Literal[_Noted.OF_VERDICT] = _Noted.OF_VERDICT


def client_address(address: Optional[IAddress]) -> Optional[str]:
    """
    The client's C{ip:port} for audit events and logs, or C{None} when it
    did not connect over IP. A factory hands it to each connection from the
    address C{buildProtocol} gets (asking the transport builds the address
    again).
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        return authority(address.host, address.port)
    return None


def tune(transport: Any) -> None:
    """
    Turn Nagle off: a proxy forwards what it has at once, and a response
    head and body written separately must not wait for a delayed ACK.
    Writes are sent at the end of the reactor's turn where the process
    allows it (L{codex_proxy._turnwrites}).
    """
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        setNoDelay(True)
        TURN_WRITES.adopt(transport)


class _ClientFlow:
    """
    The flow of a client connection's bytes: the read gate (reading
    paused for independent reasons), client bytes kept for later, and
    back-pressure on what the connection writes itself.

    @ivar pending: client bytes kept for later (L{keep}).
    """

    transport: IProxyTransport
    closing: bool
    pending = b""
    _paused: FrozenSet[str] = frozenset()
    _writeGate: Optional[_WriteGate] = None
    _producer: Optional[IPushProducer] = None
    _switch: Optional[_Switch] = None

    def pauseReading(self, why: str) -> None:
        """
        Stop reading the client for C{why}; reading resumes once every
        reason is gone, so independent reasons never undo each other.
        """
        if not self._paused:
            self.transport.pauseProducing()
        self._paused = self._paused | {why}

    def resumeReading(self, why: str) -> None:
        if why not in self._paused:
            return
        self._paused = self._paused - {why}
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
        gate = self._writeGate
        if gate is None:
            gate = self._writeGate = _WriteGate(self)
        self.produce(gate)

    def produce(self, producer: Optional[IPushProducer]) -> None:
        """
        Make C{producer} the client transport's (streaming) producer, in
        place of the one before; C{None} for none. The transport's producer
        is one L{_Switch} that passes on to C{producer}: the producer
        changes twice per request (exchange, gate), and registering each
        with the transport costs eight calls into Twisted.
        """
        if producer is self._producer:
            return
        if self._producer is not None and self._producer is self._writeGate:
            # An unregistered gate can no longer resume what it paused.
            self.resumeReading("write")
        self._producer = producer
        switch = self._switch
        if producer is None:
            if switch is not None:
                self._switch = None
                self.transport.unregisterProducer()
            return
        if switch is None:
            switch = self._switch = _Switch(producer)
            self.transport.registerProducer(switch, True)
        else:
            switch.target = producer

    def writesDrained(self) -> None:
        """
        The client read what was written: override to go on with work held
        back meanwhile.
        """


class ClientConnection(_ClientFlow, Protocol):
    """
    One client connection of a listener. The factory provides
    C{connections} (a L{codex_proxy.connections.Connections}) and C{clock}.

    @cvar listener: the listener's name in the outcome event.
    @ivar admitted: within C{max_connections}; when not, the listener
        refuses the first request (with its audit event) and closes.
        C{None} until C{connectionMade} admits the connection, unless a
        protocol that takes it over (L{takeOver}) carries the admission on.
    @ivar client: the client's C{ip:port}, or C{None}.
    @ivar closing: the connection is being closed, by either side: pending
        work that still fires is ignored.
    @ivar relay: the relay once the connection has become a tunnel.
    @ivar bytesUp: bytes forwarded client to destination outside a relay.
    @ivar bytesDown: bytes forwarded destination to client outside a relay.
    @ivar clientEOF: the client has half-closed its side.
    @ivar identity: the client that authenticated last on this connection
        (SPEC §11), or C{None}.
    """

    listener = "client"
    factory: Any
    transport: IProxyTransport
    # What a connection starts with, as class defaults: a connection sets
    # its own only when one changes (most never do).
    closing = False
    relay: Optional[Relay] = None
    bytesUp = 0
    bytesDown = 0
    clientEOF = False
    identity: Optional[str] = None
    client: Optional[str] = None
    admitted: Optional[bool] = None
    # The latest decision, and how the connection ends: _OF_VERDICT until
    # noteEnd says otherwise. Read off the verdict once, as it closes.
    _noted: Optional[Verdict] = None
    _reason: Union[str, None, Literal[_Noted.OF_VERDICT]] = None
    _outcome: Union[str, Literal[_Noted.OF_VERDICT]] = "closed"

    def connectionMade(self) -> None:
        if self.admitted is None:
            # Not a connection taken over (takeOver), already admitted.
            self.admitted = self.factory.connections.admit(self.transport, self.listener)
            self._started = self.factory.clock.seconds()
        if self.client is None:
            self.client = client_address(self.transport.getPeer())

    def takeOver(self, previous: "ClientConnection") -> None:
        """
        Go on as the protocol of C{previous}'s connection, which another
        listener answered and hands over (an intercepted SOCKS5 CONNECT): it
        stays the connection C{previous} admitted, registered and counted
        under its listener, for the client it authenticated as, since its
        accept; one outcome event, this protocol's, ends it.
        """
        self.listener = previous.listener
        self.client = previous.client
        self.identity = previous.identity
        self.admitted = previous.admitted
        self._started = previous._started

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closing = True
        self.abandon()
        up, down = self.bytesUp, self.bytesDown
        verdict, why, outcome = self._noted, self._reason, self._outcome
        if why is _OF_VERDICT:
            assert verdict is not None
            why = None if verdict.reason is None else verdict.reason.value
        if outcome is _OF_VERDICT:
            assert verdict is not None
            outcome = "closed" if verdict.allowed else "blocked"
        if self.relay is not None:
            self.relay.clientLost()
            up, down = up + self.relay.bytesUp, down + self.relay.bytesDown
        self.factory.connections.closed(
            self.transport,
            ConnectionOutcome(
                listener=self.listener,
                client=self.client,
                decision=None if verdict is None else verdict.decision.value,
                reason=why,
                outcome=outcome,
                identity=self.identity,
                bytes_up=up,
                bytes_down=down,
                duration=self.factory.clock.seconds() - self._started,
                tunnel=self.relay is not None,
            ),
        )

    def writeConnectionLost(self) -> None:
        """A relayed EOF half-closed our side; C{connectionLost} follows."""

    def abandon(self) -> None:
        """
        Release what the current state holds (its pending Deferred, timer,
        outbound leg), when the connection closes or aborts; idempotent.
        """
        raise NotImplementedError

    # -- client authentication (SPEC §11) -----------------------------------

    def admitHTTP(self, head: RequestHead, tunnelled: bool) -> Optional[Reason]:
        """
        Why a request is refused before any policy, or C{None}: the
        connection is over C{limits.max_connections}; the request went
        round a loop (our own C{Via}, SPEC §4.2b); outside a tunnel (inside
        one, the tunnel's client holds) its C{Proxy-Authorization} fails
        against the clients of the policy in force, so a token rotated by a
        reload is refused from the next request on (see L{identify}).
        """
        if not self.admitted:
            return Reason.TOO_MANY_CONNECTIONS
        if came_through(head, self.factory.via):
            return Reason.PROXY_LOOP
        credentials = self.factory.policy.policy.credentials
        if tunnelled or not credentials.configured:
            return None
        return self.identify(*credentials.http(head.header(b"proxy-authorization")))

    def identified(self, request: ProxyRequest) -> ProxyRequest:
        """
        C{request} as made by the client this connection authenticated as
        (a request read for the identity before is the same request).
        """
        if request.client_identity == self.identity:
            return request
        return attrs.evolve(request, client_identity=self.identity)

    def authenticateSOCKS(self, username: str, password: bytes) -> Optional[Reason]:
        """
        Check an RFC 1929 username and password; see L{identify}.
        """
        credentials = self.factory.policy.policy.credentials
        if not credentials.configured:
            self.identity = username
            return None
        return self.identify(*credentials.socks(username, password))

    def identify(self, accepted: bool, identity: Optional[str]) -> Optional[Reason]:
        """
        Take the outcome of a credentials check: the reason to refuse the
        request (failed, or the client holds
        C{limits.max_connections_per_client} connections), or C{None};
        L{identity} is set to the client (C{None}: anonymous or failed).
        """
        if not accepted:
            self.identity = None
            return Reason.CLIENT_AUTH_FAILED
        # Kept even over the limit, so the refusal is audited as this client's.
        self.identity = identity
        if not self.factory.connections.claim(self.transport, identity):
            return Reason.TOO_MANY_CLIENT_CONNECTIONS
        return None

    # -- outcome ----------------------------------------------------------

    def noteVerdict(self, verdict: Verdict) -> None:
        """
        Remember the latest decision for the outcome event.
        """
        self._noted = verdict
        self._reason = self._outcome = _OF_VERDICT

    def noteEnd(self, outcome: str, reason: Optional[str] = None) -> None:
        """
        Remember how the connection is ending (C{outcome} as in
        L{ConnectionOutcome}), and why, when there is a reason.
        """
        self._outcome = outcome
        if reason is not None:
            self._reason = reason

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

        # One callback for both outcomes: each callback a Deferred holds
        # costs its run, and a dial's or decision's Deferred runs once per
        # connection.
        def settled(result: Union[T, Failure]) -> None:
            try:
                if not isinstance(result, Failure):
                    if not self.closing:
                        callback(result)
                elif not self.closing:
                    errback(result)
                elif not result.check(defer.CancelledError, UpstreamError):
                    self.internalError(result)  # a bug, whenever it shows
            except BaseException:
                self.internalError(Failure())

        d.addBoth(settled)

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
        Close after what is written has been sent. The transport's producer
        goes first: the transport stops the one it has when the connection
        is lost, and that may now be a destination parked for others.
        """
        self.closing = True
        self.abandon()
        self.produce(None)
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
        timer: Optional[Timer] = None,
    ) -> Relay:
        """
        Become a byte tunnel between the client and C{out}: first relay
        C{fromServer} (bytes the destination already sent) and
        C{fromClient} (bytes the client pipelined), then pass on a
        half-close the client already made. The tunnel's idle watch takes
        the connection's C{timer}, if it has one.
        """
        self.produce(None)
        relay = self.relay = splice.relay(self.transport, out.transport, self.factory.clock, idle_timeout, timer)
        # What the relay made the client transport's producer: the
        # destination for the portable relay, none for a spliced one.
        self._producer = getattr(self.transport, "producer", None)
        out.attach(relay)
        self.factory.connections.tunnelled(self.listener)
        if self._paused:
            self._paused = frozenset()
            self.transport.resumeProducing()
        if fromServer:
            relay.outboundData(fromServer)
        if fromClient:
            relay.fromClient(fromClient)
        if clientEOF:
            relay.clientEOF()
        return relay


@implementer(IPushProducer)
class _Switch:
    """
    A client transport's producer while an exchange or the write gate
    produces for it (L{_ClientFlow.produce}): it passes the transport's
    calls on to C{target}. Twisted does the same to a producer registered
    in place of another: one the transport had paused is resumed once its
    buffer drains, and the one in place when the connection is lost is
    stopped.
    """

    def __init__(self, target: IPushProducer) -> None:
        self.target = target

    def pauseProducing(self) -> None:
        self.target.pauseProducing()

    def resumeProducing(self) -> None:
        self.target.resumeProducing()

    def stopProducing(self) -> None:
        self.target.stopProducing()


@implementer(IPushProducer)
class _WriteGate:
    """
    The client transport's producer between relays and exchanges (see
    L{_ClientFlow.watchWrites}).
    """

    def __init__(self, connection: _ClientFlow) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:
        self._connection.pauseReading("write")

    def resumeProducing(self) -> None:
        self._connection.resumeReading("write")
        self._connection.writesDrained()

    def stopProducing(self) -> None:
        pass
