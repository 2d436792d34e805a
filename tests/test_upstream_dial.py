"""
A direct dial over real loopback TCP (L{codex_proxy._dial.Connecting} on
the test reactor, a posix one): it connects over IPv4 and IPv6 and carries
bytes both ways; a refused, timed-out, cancelled or abandoned dial fails as
the listeners expect and leaves no socket open or registered; and the
connection it made is freed by reference counting once it closes, leaving
no reference cycle (a dial, its Deferred, its transport) for the collector.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import warnings
from ipaddress import ip_address
from typing import Any, Iterator, List

import pytest
import pytest_twisted
from twisted.internet import base, defer, error, main, reactor, task
from twisted.internet.protocol import Factory, Protocol

from codex_proxy import _dial
from codex_proxy._dial import Connecting, Dialled
from codex_proxy.addresses import authority
from codex_proxy.errors import UpstreamError
from codex_proxy.upstream import Upstream, _Dialling
from support.ends import End


class _Origin(Protocol):
    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_a_closed_outbound_connection_leaves_no_cycle_for_the_collector():
    origin = _Origin()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: origin), interface="127.0.0.1")
    enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        out = yield Upstream(reactor).connect([ip_address("127.0.0.1")], port.getHost().port)
        assert out.transport.getPeer().port == port.getHost().port
        out.transport.loseConnection()
        del out
        yield origin.lost
        yield task.deferLater(reactor, 0, lambda: None)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (Connecting, _Dialling, base.BaseConnector))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
        yield port.stopListening()
    assert left == []


class _Sink:
    """
    What an outbound connection reads; C{got} fires at C{expected} bytes.
    """

    def __init__(self, expected: int) -> None:
        self.received = bytearray()
        self.expected = expected
        self.got: defer.Deferred[None] = defer.Deferred()

    def outboundData(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expected and not self.got.called:
            self.got.callback(None)

    def outboundEOF(self) -> None:
        pass

    def outboundLost(self, reason: Any) -> None:
        pass


class _Answering(End):
    """
    An origin that answers C{response} once it has read C{request}.
    """

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if bytes(self.received) == b"request":
            self.transport.write(b"response")


def _dials() -> List[Connecting]:
    """
    Dials the reactor is waiting on, or whose timeout it still holds.
    """
    waiting = [w for w in reactor.getWriters() if isinstance(w, Connecting)]
    timing = [c.func.__self__ for c in reactor.getDelayedCalls() if isinstance(getattr(c.func, "__self__", None), Connecting)]
    # A dial in progress is both: count it once.
    return list(dict.fromkeys(waiting + timing))


@pytest.fixture(autouse=True)
def unclosed() -> Iterator[List[warnings.WarningMessage]]:
    """
    No socket of a dial is left to the collector to close.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield caught
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def _fds() -> int:
    """
    File descriptors this process holds open.
    """
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest_twisted.inlineCallbacks
def test_a_dial_connects_and_carries_bytes_both_ways(host):
    origin = _Answering(closeOnEOF=True)
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: origin), interface=host)
    try:
        out = yield Upstream(reactor).connect([ip_address(host)], port.getHost().port)
        assert isinstance(out.transport, Dialled)
        assert (out.transport.getPeer().host, out.transport.getPeer().port) == (host, port.getHost().port)
        assert _dials() == []
        sink = _Sink(8)
        out.attach(sink)
        out.transport.write(b"request")
        yield sink.got
        assert (bytes(origin.received), bytes(sink.received)) == (b"request", b"response")
        out.transport.loseConnection()
        yield origin.lost
        # How logs name it, while open and once closed.
        assert repr(out.transport) == f"<Outbound to {authority(host, port.getHost().port)}>"
    finally:
        yield port.stopListening()


@defer.inlineCallbacks
def _carries(d: defer.Deferred, origin: Any) -> Any:
    """
    The connection C{d} fires with carries a request to C{origin} and its
    response back, then closes.
    """
    out = yield d
    sink = _Sink(8)
    out.attach(sink)
    out.transport.write(b"request")
    yield sink.got
    assert bytes(sink.received) == b"response"
    out.transport.loseConnection()
    yield origin.lost


@pytest_twisted.inlineCallbacks
def test_a_loopback_dial_is_connected_before_connect_returns(monkeypatch):
    """
    On loopback the handshake is over as C{connect} returns: the dial has
    settled, with no registration for writability and no timer.
    """
    origin = _Answering(closeOnEOF=True)
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: origin), interface="127.0.0.1")
    registered: List[Any] = []
    monkeypatch.setattr(reactor, "addWriter", registered.append)
    timers = len(reactor.getDelayedCalls())
    try:
        d = Upstream(reactor).connect([ip_address("127.0.0.1")], port.getHost().port)
        assert d.called
        assert (registered, len(reactor.getDelayedCalls())) == ([], timers)
        monkeypatch.undo()
        yield _carries(d, origin)
    finally:
        monkeypatch.undo()
        yield port.stopListening()


@pytest.mark.parametrize("flag", [True, False], ids=["SOCK_NONBLOCK", "setblocking"])
@pytest_twisted.inlineCallbacks
def test_a_dial_socket_is_non_blocking_from_the_start(monkeypatch, flag):
    """
    The dial's socket is made non-blocking as it is made (one system call),
    or, where the system lacks C{SOCK_NONBLOCK}, right after; either way
    its connect never waits and the connection carries bytes.
    """
    if not flag:
        monkeypatch.setattr(_dial, "_NONBLOCK", 0)
    made: list = []
    real = socket.socket

    class Recording(real):
        def __init__(self, family: int = -1, type: int = -1, *args: Any, **kw: Any) -> None:
            super().__init__(family, type, *args, **kw)
            made.append(("socket", type, self.getblocking()))

        def setblocking(self, flag: bool) -> None:
            made.append(("setblocking", flag))
            super().setblocking(flag)

        def connect_ex(self, address: Any) -> int:
            made.append(("connect", self.getblocking()))
            return super().connect_ex(address)

    origin = _Answering(closeOnEOF=True)
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: origin), interface="127.0.0.1")
    try:
        monkeypatch.setattr(socket, "socket", Recording)
        d = Upstream(reactor).connect([ip_address("127.0.0.1")], port.getHost().port)
        # Only the dial's own socket is recorded.
        monkeypatch.setattr(socket, "socket", real)
        connected = made.index(("connect", False))
        if flag:
            assert made[:connected] == [("socket", socket.SOCK_STREAM | socket.SOCK_NONBLOCK, False)]
        else:
            assert made[:connected] == [("socket", socket.SOCK_STREAM, True), ("setblocking", False)]
        yield _carries(d, origin)
    finally:
        yield port.stopListening()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("known", [True, False], ids=["known-at-once", "known-when-writable"])
@pytest_twisted.inlineCallbacks
def test_a_refused_dial_fails_as_refused_and_leaves_nothing_registered(monkeypatch, known):
    if not known:
        # As a remote refusal: not yet known as connect returns.
        monkeypatch.setattr(_dial, "_outcome", lambda sock: None)
    port = _closed_port()
    fds = _fds()
    d = Upstream(reactor).connect([ip_address("127.0.0.1")], port)
    assert d.called is known
    with pytest.raises(UpstreamError) as e:
        yield d
    assert (e.value.reason.value, e.value.message) == ("upstream_refused", f"127.0.0.1:{port} refused the connection")
    assert (_dials(), _fds()) == ([], fds)


@pytest.fixture
def unanswered() -> Iterator[int]:
    """
    A port whose listener answers no new connection: its accept queue is
    full, so the kernel drops their SYNs and a dial waits.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    filling = []
    for _ in range(2):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        filling.append(s)
    yield port
    for s in filling:
        s.close()
    listener.close()


@pytest_twisted.inlineCallbacks
def test_a_dial_that_gets_no_answer_times_out_and_closes_its_socket(unanswered):
    fds = _fds()
    d = Upstream(reactor, connect_timeout=0.2).connect([ip_address("127.0.0.1")], unanswered)
    [dial] = _dials()
    with pytest.raises(UpstreamError) as e:
        yield d
    assert (e.value.reason.value, e.value.message) == (
        "upstream_timeout", f"connecting to 127.0.0.1:{unanswered} timed out"
    )
    assert (_dials(), dial.fileno(), _fds()) == ([], -1, fds)


@pytest_twisted.inlineCallbacks
def test_a_cancelled_dial_fails_as_cancelled_and_closes_its_socket(unanswered):
    fds = _fds()
    d = Upstream(reactor).connect([ip_address("127.0.0.1")], unanswered)
    [dial] = _dials()
    d.cancel()
    with pytest.raises(defer.CancelledError):
        yield d
    assert (_dials(), dial.fileno(), _fds()) == ([], -1, fds)


@pytest_twisted.inlineCallbacks
def test_a_dial_the_reactor_drops_fails_as_a_connect_failure(unanswered):
    # What a reactor shutting down does to every selectable it holds.
    fds = _fds()
    d = Upstream(reactor).connect([ip_address("127.0.0.1")], unanswered)
    [dial] = _dials()
    reactor._disconnectSelectable(dial, main.CONNECTION_LOST, False)
    with pytest.raises(UpstreamError) as e:
        yield d
    assert e.value.reason.value == "upstream_connect_failed"
    assert (_dials(), dial.fileno(), _fds()) == ([], -1, fds)



class _Unreachable(socket.socket):
    def connect_ex(self, address: Any) -> int:
        return errno.ENETUNREACH


class _Unaddressable(socket.socket):
    def connect_ex(self, address: Any) -> int:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.mark.parametrize(
    "kind, why",
    [(_Unreachable, "Network is unreachable"), (_Unaddressable, "Name or service not known")],
)
def test_a_dial_the_kernel_refuses_at_once_fails_at_once(monkeypatch, kind, why):
    fds = _fds()
    monkeypatch.setattr(socket, "socket", kind)
    dial = Connecting(reactor, "127.0.0.1", 80, 10.0, lambda made: Protocol())
    monkeypatch.undo()
    failures: list = []
    dial.deferred.addErrback(failures.append)
    [failure] = failures
    assert failure.check(error.ConnectError) and why in failure.getErrorMessage()
    assert (_dials(), dial.fileno(), _fds()) == ([], -1, fds)


class _NoDescriptors(socket.socket):
    def __init__(self, *args: Any, **kw: Any) -> None:
        raise OSError(errno.EMFILE, "Too many open files")


@pytest_twisted.inlineCallbacks
def test_a_dial_without_a_socket_to_be_had_fails_as_a_connect_failure(monkeypatch):
    monkeypatch.setattr(socket, "socket", _NoDescriptors)
    d = Upstream(reactor).connect([ip_address("127.0.0.1")], 80)
    monkeypatch.undo()
    with pytest.raises(UpstreamError) as e:
        yield d
    assert (e.value.reason.value, e.value.message) == (
        "upstream_connect_failed",
        "connecting to 127.0.0.1:80 failed: An error occurred while connecting: 24: Too many open files.",
    )
    assert _dials() == []


class _Broken(Protocol):
    def connectionMade(self) -> None:
        raise RuntimeError("broken connectionMade")


@pytest_twisted.inlineCallbacks
def test_a_connection_whose_protocol_fails_to_start_is_closed_and_the_error_logged(logged_errors):
    origin = End()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: origin), interface="127.0.0.1")
    try:
        dial = Connecting(reactor, "127.0.0.1", port.getHost().port, 10.0, lambda made: _Broken())
        with pytest.raises(error.ConnectError, match="protocol failed to start"):
            yield dial.deferred
        yield origin.lost
        assert [e["log_failure"].value.args for e in logged_errors] == [("broken connectionMade",)]
        del logged_errors[:]
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_settled_dial_is_unregistered_by_its_descriptor(monkeypatch):
    # The reactor searches all its selectables for one whose fileno() is -1:
    # with thousands of connections open, that is a cost per dial.
    origin = End(closeOnEOF=True)
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: origin), interface="127.0.0.1")
    removed: List[int] = []
    removeWriter = reactor.removeWriter

    def noting(selectable: Any) -> None:
        if isinstance(selectable, Connecting):
            removed.append(selectable.fileno())
        removeWriter(selectable)

    monkeypatch.setattr(reactor, "removeWriter", noting)
    # As a remote destination's: the handshake still under way as connect returns.
    monkeypatch.setattr(_dial, "_outcome", lambda sock: None)
    try:
        out = yield Upstream(reactor).connect([ip_address("127.0.0.1")], port.getHost().port)
        assert len(removed) == 1 and removed[0] == out.transport.fileno() != -1
        out.transport.loseConnection()
        yield origin.lost
    finally:
        monkeypatch.undo()
        yield port.stopListening()
