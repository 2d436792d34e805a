"""
Writes sent at the end of the reactor's turn reach the peer like Twisted's
own: whole, in order, before a close or a half-close, and from timed calls
too, without registering the socket for writability; and uninstalling
gives the reactor and the transports Twisted's path back.

Over real loopback TCP connections in the test reactor.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport

from codex_proxy._turnwrites import TurnWrites
from support.ends import End


@pytest.fixture
def writes() -> Iterator[TurnWrites]:
    turn = TurnWrites()
    assert turn.install(reactor)
    yield turn
    turn.uninstall()


@defer.inlineCallbacks
def _pair(writes: TurnWrites) -> Any:
    """
    A loopback connection: the adopted (proxy's) end, and the peer.
    """
    ours, peer = End(closeOnEOF=True), End(closeOnEOF=True)
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: peer), interface="127.0.0.1")
    factory = ClientFactory.forProtocol(lambda: ours)
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    yield defer.gatherResults([ours.made, peer.made])
    yield port.stopListening()
    writes.adopt(ours.transport)
    return ours, peer


@pytest_twisted.inlineCallbacks
def test_a_turns_writes_arrive_in_order_without_registering_for_writability(writes):
    ours, peer = yield _pair(writes)
    ours.transport.write(b"head ")
    ours.transport.write(b"body")
    assert ours.transport not in reactor.getWriters()
    yield peer.until(9)
    assert bytes(peer.received) == b"head body"
    ours.transport.loseConnection()
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_more_than_the_kernel_takes_at_once_arrives_whole(writes):
    ours, peer = yield _pair(writes)
    data = bytes(range(256)) * (32 * 1024)
    ours.transport.write(data)
    yield peer.until(len(data))
    assert bytes(peer.received) == data
    ours.transport.loseConnection()
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_a_close_right_after_a_write_sends_it_first(writes):
    ours, peer = yield _pair(writes)
    ours.transport.write(b"last words")
    ours.transport.loseConnection()
    yield peer.lost
    assert bytes(peer.received) == b"last words"


@pytest_twisted.inlineCallbacks
def test_a_half_close_right_after_a_write_sends_it_then_eof(writes):
    ours, peer = yield _pair(writes)
    ours.transport.write(b"request")
    ours.transport.loseWriteConnection()
    yield peer.eof
    assert bytes(peer.received) == b"request"
    # Only our side is closed: the peer still writes to us.
    peer.transport.write(b"response")
    yield ours.until(8)
    assert bytes(ours.received) == b"response"
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_writes_of_a_timed_call_are_sent(writes):
    ours, peer = yield _pair(writes)
    reactor.callLater(0, ours.transport.write, b"later")
    yield peer.until(5)
    assert bytes(peer.received) == b"later"
    ours.transport.loseConnection()
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_a_write_to_a_reset_connection_loses_it(writes):
    ours, peer = yield _pair(writes)
    # Not reading, only the failed send can tell that the peer is gone:
    # the flush hands the failure to the reactor, which loses the connection.
    ours.transport.stopReading()
    peer.transport.abortConnection()
    yield peer.lost
    for _ in range(3):
        ours.transport.write(b"x" * 65536)
    yield ours.lost


@pytest_twisted.inlineCallbacks
def test_uninstalled_the_reactor_and_adopted_transports_take_twisteds_path(writes):
    ours, peer = yield _pair(writes)
    base = type(reactor).__mro__[1]
    writes.uninstall()
    assert type(reactor) is base
    ours.transport.write(b"plain")
    assert ours.transport in reactor.getWriters()
    yield peer.until(5)
    assert bytes(peer.received) == b"plain"
    ours.transport.loseConnection()
    yield peer.lost


def test_only_a_posix_reactor_and_plain_tcp_are_changed():
    turn = TurnWrites()
    memory = MemoryReactorClock()
    assert not turn.install(memory)
    assert type(memory) is MemoryReactorClock
    transport = StringTransport()
    turn.adopt(transport)
    assert type(transport) is StringTransport
