"""
The one bidirectional byte pump: CONNECT tunnels, SOCKS5 and websockets,
and the one idle watch (used by the relay and by plain HTTP exchanges).

Each transport is registered as the streaming producer of the other, so a
slow reader on one side stops reading on the other side (the kernel buffers
then push back on the writer): memory per tunnel stays bounded whatever the
speed difference. Half-closes are passed through, and a tunnel with no
traffic in either direction for C{idle_timeout} seconds is closed.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy.upstream import IProxyTransport, ISink

#: Bytes read per call on a relayed socket (Twisted's default is 64 KiB);
#: also the write buffer above which the other side stops being read.
_READ_SIZE = 1 << 17


class Timer:
    """
    A connection's one timer, kept across its requests and its tunnel.
    Arming it for a later deadline only notes the deadline: the pending
    call, when it comes, finds it early and moves itself on (so a request
    that re-arms pays for one clock reading, and the reactor is not asked
    to move the call each time). A sooner deadline takes a new call
    (Twisted moves a call sooner by a linear search of all pending calls).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._call: Optional[IDelayedCall] = None
        # When the pending call fires, and when it is due to expire.
        self._due = 0.0
        self._deadline = 0.0
        self._expired: Optional[Callable[[], None]] = None

    def arm(self, seconds: float, expired: Callable[[], None]) -> None:
        """
        Call C{expired} in C{seconds}, instead of what was armed before.
        """
        self._expired = expired
        deadline = self._deadline = self._clock.seconds() + seconds
        call = self._call
        if call is not None:
            if deadline >= self._due:
                return
            call.cancel()
        self._due = deadline
        self._call = self._clock.callLater(seconds, self._fire)

    def disarm(self) -> None:
        """
        Call nothing; the pending call stays (firing, it finds nothing to
        call), and the next L{arm} notes its deadline against it.
        """
        self._expired = None

    def stop(self) -> None:
        """
        Cancel the pending call: the connection is closing.
        """
        self._expired = None
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def _fire(self) -> None:
        self._call = None
        if self._expired is None:
            return
        early = self._deadline - self._clock.seconds()
        if early > 0:
            self._due = self._deadline
            self._call = self._clock.callLater(early, self._fire)
            return
        expired, self._expired = self._expired, None
        expired()


def _nothing() -> None:
    pass


def _nothing_moved() -> int:
    return 0


class IdleWatch:
    """
    Calls C{expired} once C{progress()} has not changed for C{timeout}
    seconds. One timer, checking a quarter period at a time instead of
    re-arming per chunk: the hot path only adds to counters, and silence
    ends between 1 and 1.25 periods after the last byte. It takes the
    connection's own L{Timer} when given one (and leaves it pending on
    L{stop}, for the connection's next use), else keeps its own.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        progress: Callable[[], int],
        expired: Callable[[], None],
        timer: Optional[Timer] = None,
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._progress = progress
        self._expired = expired
        self._seen = progress()
        self._lastActive = clock.seconds()
        self._own = timer is None
        self._timer = Timer(clock) if timer is None else timer
        self._timer.arm(timeout / 4, self._check)

    def stop(self) -> None:
        if self._own:
            self._timer.stop()
        else:
            self._timer.disarm()
        # Its owner holds it and it holds its owner's methods: let go of
        # them, so that the two are freed when the owner is, not by the
        # garbage collector's next pass.
        self._progress = _nothing_moved
        self._expired = _nothing

    def _check(self) -> None:
        now = self._clock.seconds()
        moved = self._progress()
        if moved != self._seen:
            self._seen = moved
            self._lastActive = now
        elif now - self._lastActive >= self._timeout:
            self._expired()
            return
        self._timer.arm(self._timeout / 4, self._check)


@implementer(ISink)
class Relay:
    """
    Joins a client transport and a server transport.

    The client's protocol forwards its events here: C{fromClient} for data,
    C{clientEOF} for a half-close, C{clientLost} when it is gone. The
    server's L{codex_proxy.upstream.Outbound} reports straight to the relay,
    its sink.

    @ivar bytesUp: bytes relayed client to server.
    @ivar bytesDown: bytes relayed server to client.
    """

    def __init__(
        self,
        client: IProxyTransport,
        server: IProxyTransport,
        clock: IReactorTime,
        idle_timeout: float,
        timer: Optional[Timer] = None,
    ) -> None:
        self.client = client
        self.server = server
        self.bytesUp = 0
        self.bytesDown = 0
        self._clientEOF = False
        self._serverEOF = False
        self._closed = False
        self._pace()
        self._idle = IdleWatch(clock, idle_timeout, self._moved, self.close, timer)

    def _pace(self) -> None:
        """
        Bound what waits in memory: each side is the other's producer.
        """
        # Larger reads for bulk transfer: fewer Python calls per byte.
        for transport in (self.client, self.server):
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = _READ_SIZE
        self.client.registerProducer(self.server, True)
        self.server.registerProducer(self.client, True)

    def _moved(self) -> int:
        return self.bytesUp + self.bytesDown

    def fromClient(self, data: bytes) -> None:
        self.bytesUp += len(data)
        self.server.write(data)

    def outboundData(self, data: bytes) -> None:
        self.bytesDown += len(data)
        self.client.write(data)

    def clientEOF(self) -> None:
        self._clientEOF = True
        self._halfClose(self.server, self._serverEOF)

    def outboundEOF(self) -> None:
        self._serverEOF = True
        self._halfClose(self.client, self._clientEOF)

    def _halfClose(self, other: IProxyTransport, otherEOF: bool) -> None:
        if otherEOF:
            self.close()
            return
        loseWrite = getattr(other, "loseWriteConnection", None)
        if loseWrite is None:
            self.close()
        else:
            loseWrite()

    def clientLost(self) -> None:
        self.close()

    def outboundLost(self, reason: Failure) -> None:
        self.close()

    def close(self) -> None:
        """
        Close both sides (after flushing what is already buffered).
        """
        if self._closed:
            return
        self._closed = True
        self._idle.stop()
        self.client.loseConnection()
        self.server.loseConnection()
