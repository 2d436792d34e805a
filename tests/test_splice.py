"""
The splice relay moves tunnel bytes like the portable one: in order both
ways with the bytes counted, passing half-closes, closing both sides when
idle; and the portable relay takes over where splice is unavailable.

Each test runs three times over real sockets in the reactor: with
C{splice} and with it taken away (socketpairs), and with C{splice} over
loopback TCP whose writes are sent at the end of the reactor's turn, as
the twistd service has them.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator, Tuple

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from codex_proxy import splice
from codex_proxy._turnwrites import TurnWrites
from codex_proxy.relay import Relay
from support.ends import End

pytestmark = pytest.mark.skipif(splice._splice is None, reason="no os.splice here")


@implementer(IHalfCloseableProtocol)
class _ProxySide(Protocol):
    """
    The proxy's end of one socket, forwarding its events to the relay like
    a client connection (C{client}) or an outbound leg does.
    """

    relay: Any = None

    def __init__(self, client: bool) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        (self.relay.fromClient if self.client else self.relay.outboundData)(data)

    def readConnectionLost(self) -> None:
        (self.relay.clientEOF if self.client else self.relay.outboundEOF)()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self.client:
            self.relay.clientLost()
        else:
            self.relay.outboundLost(reason)


def _adopt(sock: socket.socket, protocol: Protocol) -> Protocol:
    reactor.adoptStreamConnection(sock.fileno(), sock.family, Factory.forProtocol(lambda: protocol))
    sock.close()
    return protocol


def _loopback_pair() -> Tuple[socket.socket, socket.socket]:
    """
    A connected pair of loopback TCP sockets (which turn writes adopt), with
    small fixed buffers, as a socketpair's: a slow reader fills them soon,
    whatever the kernel's autotuning would allow.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            one.setsockopt(socket.SOL_SOCKET, option, 1 << 16)
        one.connect(listener.getsockname())
        other, _ = listener.accept()
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        other.setsockopt(socket.SOL_SOCKET, option, 1 << 16)
    return one, other


@pytest.fixture(params=["splice", "portable", "splice, turn writes"])
def tunnel(request: Any, monkeypatch: Any) -> Iterator[Tuple[End, Relay, End, task.Clock]]:
    """
    A client end, the relay, a server end, and the relay's idle clock. With
    turn writes, as in the twistd service, the proxy's two sockets are TCP
    and write at the end of the reactor's turn.
    """
    if request.param == "portable":
        monkeypatch.setattr(splice, "_splice", None)
    turn = TurnWrites() if request.param == "splice, turn writes" else None
    pair = socket.socketpair if turn is None else _loopback_pair
    clientApp, clientProxy = pair()
    serverProxy, serverApp = pair()
    client, server = End(), End()
    _adopt(clientApp, client)
    _adopt(serverApp, server)
    proxyClient, proxyServer = _ProxySide(client=True), _ProxySide(client=False)
    _adopt(clientProxy, proxyClient)
    _adopt(serverProxy, proxyServer)
    if turn is not None:
        assert turn.install(reactor)
        for side in (proxyClient, proxyServer):
            turn.adopt(side.transport)
            assert type(side.transport).__module__ == "codex_proxy._turnwrites"
    clock = task.Clock()
    relay = splice.relay(proxyClient.transport, proxyServer.transport, clock, 60.0)
    proxyClient.relay = proxyServer.relay = relay
    assert type(relay) is (Relay if request.param == "portable" else splice.SpliceRelay)
    yield client, relay, server, clock
    for end in (client, server, proxyClient, proxyServer):
        end.transport.abortConnection()
    if turn is not None:
        turn.uninstall()


@pytest_twisted.inlineCallbacks
def test_bytes_pass_in_order_both_ways_and_are_counted(tunnel):
    client, relay, server, _ = tunnel
    up = bytes(range(256)) * 4096
    down = b"d" * 300_000
    # Bytes the proxy already holds go ahead of what it reads later.
    relay.outboundData(b"early:")
    client.transport.write(up)
    server.transport.write(down)
    yield server.until(len(up))
    yield client.until(len(down) + 6)
    assert bytes(server.received) == up
    assert bytes(client.received) == b"early:" + down
    assert (relay.bytesUp, relay.bytesDown) == (len(up), len(down) + 6)
    if isinstance(relay, splice.SpliceRelay):
        # Past the first bytes, both ways went through a pipe.
        assert [(d.source, d.sink) for d in relay._directions] == [
            (relay.client, relay.server), (relay.server, relay.client)
        ]


@pytest_twisted.inlineCallbacks
def test_a_short_exchange_takes_no_pipe(tunnel):
    client, relay, server, _ = tunnel
    client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    yield server.until(18)
    server.transport.write(b"HTTP/1.1 204 \r\n\r\n")
    yield client.until(17)
    assert (relay.bytesUp, relay.bytesDown) == (18, 17)
    if isinstance(relay, splice.SpliceRelay):
        assert relay._directions == []


@pytest.mark.parametrize("size", [7, 3 * splice.SPLICE_AFTER], ids=["small", "piped"])
@pytest_twisted.inlineCallbacks
def test_a_half_close_passes_through_and_the_other_way_stays_open(tunnel, size):
    client, relay, server, _ = tunnel
    client.transport.write(b"q" * size)
    client.transport.loseWriteConnection()
    yield server.eof
    assert bytes(server.received) == b"q" * size
    server.transport.write(b"a" * size)
    yield client.until(size)
    assert not client.eof.called
    server.transport.loseConnection()
    yield client.eof
    assert bytes(client.received) == b"a" * size
    assert (relay.bytesUp, relay.bytesDown) == (size, size)


@pytest_twisted.inlineCallbacks
def test_an_idle_tunnel_is_closed_on_both_sides(tunnel):
    client, relay, server, clock = tunnel
    client.transport.write(b"x")
    yield server.until(1)
    clock.advance(30)
    clock.advance(30)
    assert not client.eof.called
    clock.advance(30)
    yield client.eof
    yield server.eof
    assert relay.bytesUp == 1


@pytest_twisted.inlineCallbacks
def test_a_slow_reader_holds_the_tunnel_and_then_gets_every_byte(tunnel):
    client, relay, server, _ = tunnel
    total = 8 << 20
    client.transport.stopReading()
    server.transport.write(b"s" * total)
    # Turn by turn until the relay stops reading the server: what waits
    # for the client fills every buffer between them.
    for _ in range(10_000):
        if relay.server not in reactor.getReaders():
            break
        yield task.deferLater(reactor, 0, lambda: None)
    assert relay.server not in reactor.getReaders()
    client.transport.startReading()
    # Nothing but the client's reading wakes the held side.
    yield client.until(total).addTimeout(30, reactor)
    assert bytes(client.received) == b"s" * total
    assert relay.bytesDown == total
