"""
Opaque tunnels in the kernel: on Linux, a relay between two plain TCP (or
unix) sockets moves bytes with C{os.splice} through a pipe per direction,
so tunnel bytes never become Python objects. Everything else (a TLS side,
a transport without a socket, a system without C{splice}) gets the
portable L{Relay}. Idle timeout, half-close, closing and byte counts are
the L{Relay}'s own, inherited.

A L{SpliceRelay} starts as the portable relay: most tunnels carry a short
exchange, which is cheaper without a pipe. Once a direction has carried
L{SPLICE_AFTER} bytes it moves to the kernel: the reading side's
C{doRead} moves bytes socket to pipe to socket, and the writing side's
C{doWrite} first drains what its pipe still holds, then does Twisted's own
(the bytes written through the transport, a half-close, a close). A side is
only read while the other has nothing waiting, so bytes keep their order
and at most one pipe's worth waits per direction.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any, Callable, List, Optional

from twisted.internet import main, tcp
from twisted.internet.interfaces import IReactorTime, ISSLTransport

from codex_proxy._turnwrites import wait_writable
from codex_proxy.relay import Relay, Timer
from codex_proxy.upstream import IProxyTransport

#: C{os.splice}, absent off Linux (and replaced by C{None} in tests).
_splice: Optional[Callable[..., int]] = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
#: Bytes a direction moves the portable way before it takes a pipe: the
#: two syscalls of a pipe and its closing cost more than a short exchange.
SPLICE_AFTER = 1 << 16
#: Bytes moved per call, and the pipe capacity asked for (the kernel may
#: give less: then calls move less).
_CHUNK = 1 << 18
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _plain(transport: IProxyTransport) -> bool:
    """
    C{transport} is a socket Twisted reads and writes itself, without TLS.
    """
    return (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and not ISSLTransport.providedBy(transport)
    )


def relay(
    client: IProxyTransport,
    server: IProxyTransport,
    clock: IReactorTime,
    idle_timeout: float,
    timer: Optional[Timer] = None,
) -> Relay:
    """
    The relay for a tunnel: a L{SpliceRelay} when both sides are plain
    sockets and C{splice} is there, else the portable L{Relay}.
    """
    if _splice is not None and _plain(client) and _plain(server):
        return SpliceRelay(client, server, clock, idle_timeout, timer)
    return Relay(client, server, clock, idle_timeout, timer)


def _unsent(transport: Any) -> int:
    """
    Bytes written through C{transport} that Twisted has not sent yet (its
    buffers as L{twisted.internet.abstract.FileDescriptor.doWrite} reads them).
    """
    unsent: int = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return unsent


class _Direction:
    """
    One way through the tunnel, once it moves by C{splice}: C{source}
    socket, a pipe, C{sink} socket; C{count} adds what went through. Built
    while the source's read is being delivered (the portable way), and
    takes over the pacing the sink's producer did until then.
    """

    def __init__(self, source: Any, sink: Any, count: Callable[[int], None]) -> None:
        assert _splice is not None
        self._splice = _splice
        self.source = source
        self.sink = sink
        self.count = count
        self._from = source.fileno()
        self._to = sink.fileno()
        self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.pipe[1], _F_SETPIPE_SZ, _CHUNK)
        except OSError:
            pass
        self.inPipe = 0
        self.held = False
        self.eof = False
        self._sinkWrite = sink.doWrite
        source.doRead = self.doRead
        sink.doWrite = self.doWrite
        # The sink stops being paced by its producer (the source): a source
        # it paused stays paused until the sink has written what it holds.
        paused = sink.producerPaused
        sink.unregisterProducer()
        if paused:
            self.held = True

    def doRead(self) -> Any:
        """
        The source is readable: splice what it has through the pipe.
        """
        if self.inPipe or _unsent(self.sink):
            self._hold()
            return None
        try:
            n = self._splice(self._from, self.pipe[1], _CHUNK, flags=_FLAGS)
        except OSError as e:
            return None if e.errno == errno.EAGAIN else main.CONNECTION_LOST
        if not n:
            self.eof = True
            return main.CONNECTION_DONE
        self.count(n)
        self.inPipe = n
        if self._drain() is not None or self.inPipe:
            # The sink is full, or failed: its doWrite goes on (or reports).
            self._hold()
        return None

    def doWrite(self) -> Any:
        """
        The sink is writable: first what the pipe holds, then Twisted's own
        buffer and closing; the source is read again once both are empty.
        """
        if self.inPipe:
            failed = self._drain()
            if failed is not None:
                return failed
            if self.inPipe:
                return None
        result = self._sinkWrite()
        if self.held and not _unsent(self.sink) and result is None:
            self.held = False
            if not (self.eof or self.source.disconnecting or self.sink.disconnected):
                self.source.startReading()
        return result

    def _drain(self) -> Any:
        try:
            while self.inPipe:
                self.inPipe -= self._splice(self.pipe[0], self._to, self.inPipe, flags=_FLAGS)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                return main.CONNECTION_LOST
        return None

    def _hold(self) -> None:
        self.held = True
        self.source.stopReading()
        # The bytes wait in the pipe, where an end-of-turn flush of an
        # adopted sink would not see them: ask for writability itself.
        wait_writable(self.sink)

    def close(self) -> None:
        """
        Close the pipe, and give both transports their own methods back.
        """
        for fd in self.pipe:
            os.close(fd)
        del self.source.doRead, self.sink.doWrite


class SpliceRelay(Relay):
    """
    A L{Relay} whose bytes move by C{splice} (see the module docstring).
    Built by L{relay} only for two plain sockets.

    @ivar _directions: the directions that moved to the kernel so far.
    """

    _lost = 0
    _up: Optional[_Direction] = None
    _down: Optional[_Direction] = None

    @property
    def _directions(self) -> List[_Direction]:
        return [d for d in (self._up, self._down) if d is not None]

    def fromClient(self, data: bytes) -> None:
        # Relay.fromClient and outboundData, inlined: one call per chunk.
        self.bytesUp += len(data)
        self.server.write(data)
        if self.bytesUp >= SPLICE_AFTER and self._up is None and not self._closed:
            self._up = _Direction(self.client, self.server, self._countUp)

    def outboundData(self, data: bytes) -> None:
        self.bytesDown += len(data)
        self.client.write(data)
        if self.bytesDown >= SPLICE_AFTER and self._down is None and not self._closed:
            self._down = _Direction(self.server, self.client, self._countDown)

    def _countUp(self, n: int) -> None:
        self.bytesUp += n

    def _countDown(self, n: int) -> None:
        self.bytesDown += n

    def clientLost(self) -> None:
        super().clientLost()
        self._gone()

    def outboundLost(self, reason: Any) -> None:
        super().outboundLost(reason)
        self._gone()

    def _gone(self) -> None:
        """
        The pipes close once both sockets are gone: until then a side that
        is closing still drains its pipe.
        """
        self._lost += 1
        if self._lost == 2:
            for direction in self._directions:
                direction.close()
