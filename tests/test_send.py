"""
L{codex_proxy._send.send}: bytes for a plain TCP socket with nothing
buffered leave at once, without waiting for the reactor; anything else
goes through the transport, in order.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from codex_proxy._send import send


@pytest.fixture
def pair():
    """
    A Twisted TCP server transport on 127.0.0.1 and the plain socket of its
    client, non-blocking.
    """
    made: defer.Deferred = defer.Deferred()

    class Accepted(Protocol):
        def connectionMade(self) -> None:
            made.callback(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Accepted), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    peer.setblocking(False)
    proto = pytest_twisted.blockon(made)
    yield proto.transport, peer
    proto.transport.abortConnection()
    peer.close()
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def test_bytes_for_an_idle_plain_socket_leave_at_once(pair):
    transport, peer = pair
    send(transport, b"HTTP/1.1 200 OK\r\n\r\n")
    assert peer.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_bytes_behind_buffered_ones_wait_their_turn(pair):
    transport, peer = pair
    transport.write(b"first")
    send(transport, b"second")
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_other_transports_are_written_through():
    transport = StringTransport()
    send(transport, b"bytes")
    assert transport.value() == b"bytes"
