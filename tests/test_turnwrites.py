"""
Writes sent at the end of the reactor's turn reach the peer like Twisted's
own: whole, in order, before a close or a half-close, and from timed calls
too, without registering the socket for writability; closes and
half-closes are done at the end of the turn the same way, with no empty
send first; what the kernel refuses for now is sent later and a reset
connection is lost; on the epoll reactor, events are handled without a logging
context each, and an error handling one is still logged; a connection
accepted with its first bytes (or its EOF) already sent is read as it is
accepted; after a turn that handled events which came soon, the poll spins
without sleeping for a while, never past the next timed call; and
uninstalling gives the reactor and the transports Twisted's path back.

Over real loopback TCP connections in the test reactor.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, epollreactor, error, main, reactor, ssl
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import log
from zope.interface import implementer

from codex_proxy import _turnwrites as turnwrites_module
from codex_proxy.ca import load_or_create_ca, mint_leaf, new_p256_key
from codex_proxy.mitm import ServerTLS, server_context
from codex_proxy._turnwrites import TurnWrites, _poll, wait_writable
from support.ends import End


class _Sends:
    """
    A socket whose sends are noted: what the transport asked the kernel to
    send, empty sends included.
    """

    def __init__(self, sock: socket.socket, *errors: BaseException, most: int = 1 << 30) -> None:
        self._sock = sock
        self._errors = list(errors)
        self._most = most
        self.sent: list[bytes] = []
        # The shutdowns and the close asked for, in order.
        self.ended: list[tuple] = []

    def send(self, data: Any) -> int:
        if self._errors:
            raise self._errors.pop(0)
        # At most C{most} bytes taken per call, as from a full socket buffer.
        data = bytes(data[: self._most])
        self.sent.append(data)
        return self._sock.send(data)

    def shutdown(self, how: int) -> None:
        self.ended.append(("shutdown", how))
        self._sock.shutdown(how)

    def close(self) -> None:
        self.ended.append(("close",))
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _lossReasons(end: End) -> list:
    """
    The reasons C{end}'s connection is lost with, as they come.
    """
    reasons: list = []
    lost = end.connectionLost
    end.connectionLost = lambda reason=None: (reasons.append(reason), lost(reason))  # type: ignore[method-assign]
    return reasons


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
def test_a_close_is_done_at_the_end_of_the_turn_without_registering_for_writability(writes):
    ours, peer = yield _pair(writes)
    ours.transport.write(b"bye")
    ours.transport.loseConnection()
    assert ours.transport not in reactor.getWriters()
    assert not ours.lost.called
    yield peer.lost
    yield ours.lost
    assert bytes(peer.received) == b"bye"


@pytest_twisted.inlineCallbacks
def test_a_half_close_is_done_at_the_end_of_the_turn_without_registering_for_writability(writes):
    ours, peer = yield _pair(writes)
    peer.closeOnEOF = False
    ours.transport.loseWriteConnection()
    assert ours.transport not in reactor.getWriters()
    yield peer.eof
    assert not ours.lost.called
    peer.transport.write(b"still open")
    yield ours.until(10)
    assert bytes(ours.received) == b"still open"
    peer.transport.loseConnection()
    yield ours.lost


@pytest_twisted.inlineCallbacks
def test_a_call_scheduled_by_a_close_done_before_the_poll_runs_without_waiting(writes):
    # The peer is a plain socket outside the reactor: no event of its own
    # wakes the reactor, so only the poll's timeout decides when the call
    # scheduled by connectionLost runs.
    listener = socket.create_server(("127.0.0.1", 0))
    ours = End()
    factory = ClientFactory.forProtocol(lambda: ours)
    reactor.connectTCP("127.0.0.1", listener.getsockname()[1], factory)
    yield ours.made
    peer, _ = listener.accept()
    listener.close()
    writes.adopt(ours.transport)
    far = reactor.callLater(30, lambda: None)
    scheduled: defer.Deferred[float] = defer.Deferred()
    ours.lost.addCallback(lambda _: reactor.callLater(0, lambda: scheduled.callback(reactor.seconds())))
    # Asked by a timed call, the close is done by the flush before the poll.
    reactor.callLater(0, ours.transport.loseConnection)
    asked = reactor.seconds()
    ran = yield scheduled
    far.cancel()
    peer.close()
    assert ran - asked < 10


@pytest_twisted.inlineCallbacks
def test_a_close_after_more_than_the_kernel_takes_at_once_sends_it_all_first(writes):
    ours, peer = yield _pair(writes)
    data = bytes(range(256)) * (32 * 1024)
    ours.transport.write(data)
    ours.transport.loseConnection()
    yield peer.lost
    assert bytes(peer.received) == data


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
def test_an_error_while_writing_is_logged_and_loses_the_connection(writes, logged_errors):
    ours, peer = yield _pair(writes)
    reasons = _lossReasons(ours)

    ours.transport.socket = _Sends(ours.transport.socket, RuntimeError("broken send"))
    ours.transport.write(b"x")
    yield ours.lost
    yield peer.lost
    assert [r.value.args for r in reasons] == [("broken send",)]
    assert [e["log_format"] for e in logged_errors] == ["writing to {transport}"]
    assert logged_errors[0]["log_failure"].check(RuntimeError)
    # Expected, so not an error of this test.
    del logged_errors[:]


@pytest_twisted.inlineCallbacks
def test_a_send_the_kernel_refuses_for_now_is_sent_later_whole(writes):
    ours, peer = yield _pair(writes)
    ours.transport.socket = _Sends(ours.transport.socket, BlockingIOError(errno.EAGAIN, "later"))
    ours.transport.write(b"head ")
    ours.transport.write(b"body")
    yield peer.until(9)
    assert bytes(peer.received) == b"head body"
    ours.transport.loseConnection()
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_a_send_to_a_reset_connection_loses_it_without_an_error_logged(writes):
    ours, peer = yield _pair(writes)
    reasons = _lossReasons(ours)
    ours.transport.socket = _Sends(ours.transport.socket, ConnectionResetError(errno.ECONNRESET, "reset"))
    ours.transport.write(b"x")
    yield ours.lost
    yield peer.lost
    assert [r.type for r in reasons] == [error.ConnectionLost]
    assert bytes(peer.received) == b""


@pytest_twisted.inlineCallbacks
def test_what_the_kernel_takes_in_part_is_sent_whole_once(writes):
    ours, peer = yield _pair(writes)
    sends = ours.transport.socket = _Sends(ours.transport.socket, most=4)
    ours.transport.write(b"01234")
    ours.transport.write(b"56789")
    yield peer.until(10)
    ours.transport.loseConnection()
    yield peer.lost
    assert bytes(peer.received) == b"0123456789"
    # One send at the end of the turn, the rest by the reactor's write events.
    assert sends.sent == [b"0123", b"4567", b"89"]


@pytest_twisted.inlineCallbacks
def test_a_send_asks_the_reactor_to_stop_watching_only_a_watched_socket(writes, monkeypatch):
    """
    A flush's send does not ask the reactor to stop watching a socket for
    writability that it does not watch (the common case); one it watches,
    as a splice relay's waiting pipe has it, it stops watching.
    """
    ours, peer = yield _pair(writes)
    asked: list = []
    remove = reactor.removeWriter
    monkeypatch.setattr(reactor, "removeWriter", lambda w: (asked.append(w), remove(w)))
    ours.transport.write(b"ab")
    yield peer.until(2)
    assert asked == []
    wait_writable(ours.transport)
    ours.transport.write(b"cd")
    assert ours.transport in reactor.getWriters()
    yield peer.until(4)
    assert asked[:1] == [ours.transport]
    assert ours.transport not in reactor.getWriters()
    assert bytes(peer.received) == b"abcd"
    ours.transport.loseConnection()
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_a_close_ends_the_connection_with_close_alone(writes):
    """
    An adopted transport closes its socket without a shutdown first: the
    peer reads what was written, then the end of the connection.
    """
    ours, peer = yield _pair(writes)
    sends = ours.transport.socket = _Sends(ours.transport.socket)
    ours.transport.write(b"last words")
    ours.transport.loseConnection()
    yield peer.lost
    assert bytes(peer.received) == b"last words"
    assert sends.ended == [("close",)]


@pytest_twisted.inlineCallbacks
def test_a_half_close_then_a_close_shut_the_write_side_once(writes):
    ours, peer = yield _pair(writes)
    peer.closeOnEOF = False
    sends = ours.transport.socket = _Sends(ours.transport.socket)
    ours.transport.write(b"request")
    ours.transport.loseWriteConnection()
    yield peer.eof
    peer.transport.write(b"answer")
    yield ours.until(6)
    ours.transport.loseConnection()
    yield ours.lost
    peer.transport.loseConnection()
    yield peer.lost
    assert (bytes(peer.received), bytes(ours.received)) == (b"request", b"answer")
    assert sends.ended == [("shutdown", socket.SHUT_WR), ("close",)]


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


@pytest_twisted.inlineCallbacks
def test_a_close_with_nothing_left_to_send_makes_no_empty_send(writes):
    ours, peer = yield _pair(writes)
    sends = ours.transport.socket = _Sends(ours.transport.socket)
    ours.transport.write(b"all")
    yield peer.until(3)
    ours.transport.loseConnection()
    yield peer.lost
    yield ours.lost
    assert sends.sent == [b"all"]
    assert bytes(peer.received) == b"all"


@pytest_twisted.inlineCallbacks
def test_a_half_close_with_nothing_left_to_send_makes_no_empty_send(writes):
    ours, peer = yield _pair(writes)
    peer.closeOnEOF = False
    sends = ours.transport.socket = _Sends(ours.transport.socket)
    ours.transport.loseWriteConnection()
    yield peer.eof
    peer.transport.write(b"reply")
    yield ours.until(5)
    assert sends.sent == []
    assert bytes(ours.received) == b"reply"
    peer.transport.loseConnection()
    yield ours.lost


@pytest_twisted.inlineCallbacks
def test_a_producer_waiting_for_the_buffer_to_drain_is_resumed(writes):
    ours, peer = yield _pair(writes)
    resumed = []

    @implementer(IPullProducer)
    class Pull:
        def resumeProducing(self) -> None:
            resumed.append(True)

        def stopProducing(self) -> None:
            pass

    ours.transport.registerProducer(Pull(), False)
    assert resumed == [True]  # asked once as it registers
    ours.transport.startWriting()  # a turn with nothing to send
    yield peer.until(0)
    yield deferLater(reactor, 0, lambda: None)
    assert resumed == [True, True]
    ours.transport.unregisterProducer()
    ours.transport.loseConnection()
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_a_write_past_the_buffer_size_pauses_a_streaming_producer_until_it_drains(writes):
    ours, peer = yield _pair(writes)
    calls: list[str] = []

    @implementer(IPushProducer)
    class Push:
        def pauseProducing(self) -> None:
            calls.append("pause")

        def resumeProducing(self) -> None:
            calls.append("resume")

        def stopProducing(self) -> None:
            calls.append("stop")

    ours.transport.registerProducer(Push(), True)
    ours.transport.write(b"x" * ours.transport.bufferSize)
    assert calls == []  # at the size, not past it
    ours.transport.write(b"y")
    assert calls == ["pause"]
    yield peer.until(ours.transport.bufferSize + 1)
    yield deferLater(reactor, 0, lambda: None)
    assert calls == ["pause", "resume"]
    ours.transport.unregisterProducer()
    ours.transport.loseConnection()
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_a_write_of_text_is_refused_and_one_after_the_close_is_dropped(writes):
    ours, peer = yield _pair(writes)
    with pytest.raises(TypeError):
        ours.transport.write("text")  # type: ignore[arg-type]
    ours.transport.write(b"last")
    ours.transport.loseConnection()
    yield ours.lost
    ours.transport.write(b" more")
    yield peer.lost
    assert bytes(peer.received) == b"last"


@pytest_twisted.inlineCallbacks
def test_writes_after_tls_started_on_an_adopted_transport_go_through_tls(writes, tmp_path):
    ours, peer = yield _pair(writes)
    authority = load_or_create_ca(str(tmp_path), time.time)
    key = new_p256_key()
    leaf = mint_leaf(authority, "localhost", key.public_key(), time.time())
    peer.transport.startTLS(ServerTLS(server_context(leaf, key, "localhost")))
    ours.transport.startTLS(ssl.CertificateOptions(verify=False))
    ours.transport.write(b"inside tls")
    # Bytes sent around the TLS layer would stall its handshake: bounded.
    yield peer.until(10).addTimeout(10, reactor)
    assert bytes(peer.received) == b"inside tls"
    ours.transport.loseConnection()
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_the_peers_close_is_read_as_the_end_of_the_connection(writes):
    ours, peer = yield _pair(writes)
    reasons = _lossReasons(ours)
    peer.transport.write(b"bye")
    peer.transport.loseConnection()
    yield ours.lost
    assert bytes(ours.received) == b"bye"
    assert reasons[0].check(error.ConnectionDone)


def test_the_turn_uses_the_epoll_reactor_of_these_tests():
    # The next tests are about the epoll reactor's turn: they mean nothing
    # on another.
    assert isinstance(reactor, epollreactor.EPollReactor)


@pytest_twisted.inlineCallbacks
def test_events_are_handled_without_a_logging_context_per_event(writes, monkeypatch):
    ours, peer = yield _pair(writes)
    wrapped = []
    callWithLogger = log.callWithLogger

    def noting(logger: Any, func: Any, *args: Any, **kw: Any) -> Any:
        wrapped.append(logger)
        return callWithLogger(logger, func, *args, **kw)

    monkeypatch.setattr(log, "callWithLogger", noting)
    peer.transport.write(b"ping")
    yield ours.until(4)
    ours.transport.write(b"pong")
    yield peer.until(4)
    assert ours.transport not in wrapped and peer.transport not in wrapped
    assert (bytes(ours.received), bytes(peer.received)) == (b"ping", b"pong")
    ours.transport.loseConnection()
    yield peer.lost


@pytest_twisted.inlineCallbacks
def test_an_error_handling_an_event_is_logged_and_loses_the_connection(writes, logged_errors):
    ours, peer = yield _pair(writes)

    def broken(data: bytes) -> None:
        raise RuntimeError("broken protocol")

    ours.dataReceived = broken
    peer.transport.write(b"x")
    yield peer.lost
    yield ours.lost
    # Twisted's own (legacy) error event, as its poll would log it.
    assert [e["failure"].value.args for e in logged_errors] == [("broken protocol",)]
    del logged_errors[:]


class _Renamed(epollreactor.EPollReactor):
    """
    An epoll reactor whose poller goes by another name, as a later Twisted
    might call it: its own poll knows, ours would not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.polled = 0
        self._epoll, self._poller = self._poller, None
        del self._poller

    def doPoll(self, timeout: Any) -> None:
        self._epoll.poll(0)
        self.polled += 1

    doIteration = doPoll


def test_an_epoll_reactor_without_the_members_our_poll_reads_keeps_its_own():
    other = _Renamed()
    turn = TurnWrites()
    try:
        assert turn.install(other)
        other.doIteration(0)
        assert other.polled == 1
    finally:
        turn.uninstall()
        other._epoll.close()
        other.waker.connectionLost(None)


class _ReadingAtOnce(End):
    """
    An accepted end that asks for its bytes to be read at once, noting what
    it had read by the end of its C{connectionMade}.
    """

    def __init__(self, writes: TurnWrites) -> None:
        super().__init__(closeOnEOF=True)
        self._writes = writes
        self.readInMade: Any = None
        self.eofInMade = False

    def connectionMade(self) -> None:
        self._writes.adopt(self.transport)
        self._writes.readNow(self.transport)
        self.readInMade = bytes(self.received)
        self.eofInMade = self.eof.called
        super().connectionMade()


@defer.inlineCallbacks
def _accepted(writes: TurnWrites, send: bytes, close: bool = False) -> Any:
    """
    A loopback client (a plain socket) that connects and sends C{send} (then
    closes, with C{close}) before the reactor accepts it; the accepted end.
    """
    ours = _ReadingAtOnce(writes)
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: ours), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    if send:
        client.sendall(send)
    if close:
        client.close()
    yield ours.made
    yield port.stopListening()
    return ours, client


@pytest_twisted.inlineCallbacks
def test_a_request_that_came_with_the_connection_is_read_as_it_is_accepted(writes):
    ours, client = yield _accepted(writes, b"GET / HTTP/1.1\r\n\r\n")
    assert ours.readInMade == b"GET / HTTP/1.1\r\n\r\n"
    ours.transport.write(b"answer")
    ours.transport.loseConnection()
    yield ours.lost
    assert client.recv(100) == b"answer"
    client.close()


@pytest_twisted.inlineCallbacks
def test_a_connection_with_nothing_sent_yet_is_read_when_its_bytes_come(writes):
    ours, client = yield _accepted(writes, b"")
    assert ours.readInMade == b""
    client.sendall(b"later")
    yield ours.until(5)
    assert bytes(ours.received) == b"later"
    client.close()
    yield ours.lost


@pytest_twisted.inlineCallbacks
def test_the_eof_of_a_connection_closed_before_it_was_accepted_is_read_as_it_is_accepted(writes, logged_errors):
    ours, client = yield _accepted(writes, b"", close=True)
    assert (ours.readInMade, ours.eofInMade) == (b"", True)
    yield ours.lost
    ours, client = yield _accepted(writes, b"bye", close=True)
    assert (ours.readInMade, ours.eofInMade) == (b"bye", False)
    yield ours.lost
    assert logged_errors == []


@pytest_twisted.inlineCallbacks
def test_without_the_turn_installed_an_accepted_connection_is_read_by_its_event():
    turn = TurnWrites()
    ours, client = yield _accepted(turn, b"hello")
    assert ours.readInMade == b""
    yield ours.until(5)
    client.close()
    yield ours.lost


_OUT = epollreactor.EPOLLOUT


class _Poller:
    """
    An epoll object that answers each poll from a script of event lists
    (then nothing), noting the timeout of each.
    """

    def __init__(self, *answers: list) -> None:
        self.answers = list(answers)
        self.timeouts: list = []

    def poll(self, timeout: float, size: int) -> list:
        self.timeouts.append(timeout)
        return self.answers.pop(0) if self.answers else []


class _Polled:
    """
    What our poll reads of an epoll reactor: its poller, its selectables,
    and how it hands an event over (here: noted).
    """

    def __init__(self, poller: _Poller) -> None:
        self._poller = poller
        self._selectables: dict = {7: "conn"}
        self.handled: list = []
        self.lost: list = []

    def _doReadOrWrite(self, selectable: Any, fd: int, event: int) -> None:
        self.handled.append((selectable, fd, event))

    def _disconnectSelectable(self, selectable: Any, why: Any, isRead: bool) -> None:
        self.lost.append((selectable, why, isRead))


class _Readable:
    """
    A selectable whose read returns C{result} (raises it, when C{raises}).
    """

    def __init__(self, result: Any, fileno: int = 7, raises: bool = False) -> None:
        self.result, self._fileno, self.raises, self.reads = result, fileno, raises, 0

    def fileno(self) -> int:
        return self._fileno

    def doRead(self) -> Any:
        self.reads += 1
        if self.raises:
            raise self.result
        return self.result


def _readable(result: Any, event: int = epollreactor.EPOLLIN, fileno: int = 7, raises: bool = False) -> tuple:
    """
    A poll of one event for a L{_Readable}: the reactor, and the selectable.
    """
    reactor_ = _Polled(_Poller([(7, event)]))
    selectable = reactor_._selectables[7] = _Readable(result, fileno, raises)
    _poll(reactor_, 0.0, 0.0)
    return reactor_, selectable


def test_a_readable_event_is_read_by_its_selectable():
    reactor_, selectable = _readable(None)
    assert (selectable.reads, reactor_.handled, reactor_.lost) == (1, [], [])


def test_a_read_that_ends_the_connection_disconnects_it_as_a_read():
    reactor_, selectable = _readable(main.CONNECTION_DONE)
    assert reactor_.lost == [(selectable, main.CONNECTION_DONE, True)]


def test_a_read_that_raises_is_logged_and_disconnects(logged_errors):
    failure = RuntimeError("broken protocol")
    reactor_, selectable = _readable(failure, raises=True)
    assert reactor_.lost == [(selectable, failure, True)]
    # Twisted's own (legacy) error event, as its poll would log it.
    assert [e["failure"].value for e in logged_errors] == [failure]
    del logged_errors[:]


@pytest.mark.parametrize(
    "event, fileno",
    [(epollreactor.EPOLLIN | epollreactor.EPOLLHUP, 7), (epollreactor.EPOLLIN | _OUT, 7), (epollreactor.EPOLLIN, -1)],
    ids=["hung up", "writable too", "closed"],
)
def test_any_other_event_goes_to_the_reactor(event, fileno):
    reactor_, selectable = _readable(None, event, fileno)
    assert (selectable.reads, reactor_.handled) == (0, [(selectable, 7, event)])


def test_without_spin_the_poll_sleeps_at_once():
    reactor_ = _Polled(_Poller([(7, _OUT)]))
    waited = _poll(reactor_, 2.0, 0.0)
    assert waited is not None and 0 <= waited < 2.0
    assert (reactor_._poller.timeouts, reactor_.handled) == ([2.0], [("conn", 7, _OUT)])


def test_an_event_that_comes_while_spinning_is_handled_without_sleeping():
    reactor_ = _Polled(_Poller([], [], [(7, _OUT)]))
    assert _poll(reactor_, None, 1.0) is not None
    assert (reactor_._poller.timeouts, reactor_.handled) == ([0, 0, 0], [("conn", 7, _OUT)])


def test_after_spinning_in_vain_the_poll_sleeps_for_what_is_left_of_the_timeout():
    reactor_ = _Polled(_Poller())
    assert _poll(reactor_, 0.5, 0.001) is None
    *spun, slept = reactor_._poller.timeouts
    assert spun and set(spun) == {0}
    assert slept == pytest.approx(0.499)


def test_spinning_never_goes_past_the_next_timed_call():
    reactor_ = _Polled(_Poller())
    assert _poll(reactor_, 0.0005, 10.0) is None
    assert reactor_._poller.timeouts[-1] == 0
    reactor_ = _Polled(_Poller())
    assert _poll(reactor_, 0, 10.0) is None
    assert reactor_._poller.timeouts == [0]


def test_a_turn_spins_only_after_events_that_came_within_the_spin(monkeypatch):
    """
    A turn spins after one that handled events which came within the spin
    of its poll: not after a turn without events (a timed call), nor after
    events that came later (a distant destination), until events come that
    soon again.
    """
    other = epollreactor.EPollReactor()
    spins: list = []
    # How long each turn's poll waited for its events (None: it had none).
    waited = iter([0.5, 0.0005, 0.0002, None, 0.0003, 0.2, 0.01])

    def polled(reactor_: Any, timeout: Any, spin: float) -> Any:
        spins.append(spin)
        return next(waited)

    monkeypatch.setattr(turnwrites_module, "_poll", polled)
    turn = TurnWrites()
    try:
        assert turn.install(other, spin=0.001)
        for _ in range(7):
            other.doIteration(0.1)
    finally:
        turn.uninstall()
        other._poller.close()
        other.waker.connectionLost(None)
    assert spins == [0.0, 0.0, 0.001, 0.001, 0.0, 0.001, 0.0]
