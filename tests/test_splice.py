"""
The splice relay moves tunnel bytes like the portable one: in order both
ways with the bytes counted, passing half-closes, closing both sides when
idle; and the portable relay takes over where splice is unavailable.

Each test runs twice over real sockets in the reactor (socketpairs, no
network address): once with C{splice}, once with it taken away.
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
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: protocol))
    sock.close()
    return protocol


@pytest.fixture(params=["splice", "portable"])
def tunnel(request: Any, monkeypatch: Any) -> Iterator[Tuple[End, Relay, End, task.Clock]]:
    """
    A client end, the relay, a server end, and the relay's idle clock.
    """
    if request.param == "portable":
        monkeypatch.setattr(splice, "_splice", None)
    clientApp, clientProxy = socket.socketpair()
    serverProxy, serverApp = socket.socketpair()
    client, server = End(), End()
    _adopt(clientApp, client)
    _adopt(serverApp, server)
    proxyClient, proxyServer = _ProxySide(client=True), _ProxySide(client=False)
    _adopt(clientProxy, proxyClient)
    _adopt(serverProxy, proxyServer)
    clock = task.Clock()
    relay = splice.relay(proxyClient.transport, proxyServer.transport, clock, 60.0)
    proxyClient.relay = proxyServer.relay = relay
    assert type(relay) is (splice.SpliceRelay if request.param == "splice" else Relay)
    yield client, relay, server, clock
    for end in (client, server, proxyClient, proxyServer):
        end.transport.abortConnection()


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
