"""
The one bidirectional byte pump: CONNECT tunnels, SOCKS5 and websockets.

Each transport is registered as the streaming producer of the other, so a
slow reader on one side stops reading on the other side (the kernel buffers
then push back on the writer): memory per tunnel stays bounded whatever the
speed difference. Half-closes are passed through, and a tunnel with no
traffic in either direction for C{idle_timeout} seconds is closed.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime, ITransport


#: Bytes read per call on a relayed socket (Twisted's default is 64 KiB);
#: also the write buffer above which the other side stops being read.
_READ_SIZE = 1 << 17


class Relay:
    """
    Joins a client transport and a server transport.

    The two protocols owning the transports forward their events here:
    C{fromClient}/C{fromServer} for data, C{clientEOF}/C{serverEOF} for a
    half-close, C{clientLost}/C{serverLost} when a connection is gone.

    @ivar bytesUp: bytes relayed client to server.
    @ivar bytesDown: bytes relayed server to client.
    """

    def __init__(
        self,
        client: ITransport,
        server: ITransport,
        clock: IReactorTime,
        idle_timeout: float,
    ) -> None:
        self.client = client
        self.server = server
        self.bytesUp = 0
        self.bytesDown = 0
        self._clientEOF = False
        self._serverEOF = False
        self._closed = False
        self._clock = clock
        self._idle = idle_timeout
        self._seen = 0
        self._lastActive = clock.seconds()
        # Larger reads for bulk transfer: fewer Python calls per byte.
        for transport in (client, server):
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = _READ_SIZE
        client.registerProducer(server, True)
        server.registerProducer(client, True)
        self._timer = clock.callLater(idle_timeout / 4, self._checkIdle)

    def fromClient(self, data: bytes) -> None:
        self.bytesUp += len(data)
        self.server.write(data)

    def fromServer(self, data: bytes) -> None:
        self.bytesDown += len(data)
        self.client.write(data)

    def clientEOF(self) -> None:
        self._clientEOF = True
        self._halfClose(self.server, self._serverEOF)

    def serverEOF(self) -> None:
        self._serverEOF = True
        self._halfClose(self.client, self._clientEOF)

    def _halfClose(self, other: ITransport, otherEOF: bool) -> None:
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

    def serverLost(self) -> None:
        self.close()

    def close(self) -> None:
        """
        Close both sides (after flushing what is already buffered).
        """
        if self._closed:
            return
        self._closed = True
        if self._timer.active():
            self._timer.cancel()
        self.client.loseConnection()
        self.server.loseConnection()

    def _checkIdle(self) -> None:
        # One timer per tunnel, checking a quarter period at a time instead of
        # re-arming per chunk: the hot path only adds to two counters, and an
        # idle tunnel closes between 1 and 1.25 idle periods after its last byte.
        now = self._clock.seconds()
        moved = self.bytesUp + self.bytesDown
        if moved != self._seen:
            self._seen = moved
            self._lastActive = now
        elif now - self._lastActive >= self._idle:
            self.close()
            return
        self._timer = self._clock.callLater(self._idle / 4, self._checkIdle)
