"""
Writes sent at the end of the reactor's turn.

Twisted's C{transport.write} buffers the bytes and registers the socket
for writability; the next turn sends them and unregisters it: two
C{epoll_ctl} calls, one more wakeup and two event dispatches for each
write, about an eighth of a kept-alive request's cost; a close or a
half-close takes the same detour. Once L{TurnWrites.install}ed on the
process's reactor, a plain TCP transport that is L{TurnWrites.adopt}ed
has what it writes sent, and its closes and half-closes done, by one flush
at the end of the turn, after every event of the turn was handled, so a
turn's writes still leave together, as they would from the next turn's
wakeup. Only the common case changes: what the kernel does not take at
once and TLS keep Twisted's own path; a failed send and a close are
reported to the reactor as its own write event would report them.

On the epoll reactor the turn also hands each event to its selectable
directly, as Twisted's own poll does but without wrapping it in a logging
context (a copy of the context dictionaries per event, about 1.3 us, twice
per kept-alive request). That context only gave Twisted's
own legacy log lines written while handling the event, an unhandled error's
traceback, their C{[Protocol,fd,address]} prefix; such lines are still
written, with the prefix C{[-]}. A plain read event goes to the
selectable's C{doRead} without the reactor's dispatch in between, and an
adopted transport's C{write} and C{doRead} are each one call rather than
Twisted's chain of three or four.
"""

from __future__ import annotations

import errno
from time import perf_counter
from typing import Any, Callable, Dict, Optional, Set, Type, cast

from twisted.internet import abstract, epollreactor, main, posixbase, tcp
from twisted.logger import Logger
from twisted.python import log as _legacy

from codex_proxy._dial import Dialled

_log = Logger()

_register = abstract.FileDescriptor.startWriting
_IN = epollreactor.EPOLLIN
_write = tcp.Connection.write
# What Twisted's TCP send takes at most at once, and the send errors it
# reads as "try again later".
_SEND_LIMIT = tcp.Connection.SEND_LIMIT
_NOT_YET = (errno.EWOULDBLOCK, errno.ENOBUFS)


def wait_writable(transport: Any) -> None:
    """
    Have the reactor report C{transport} writable, adopted or not: for bytes
    that wait outside Twisted's buffers (a splice pipe), which an adopted
    transport's C{startWriting}, a flush at the end of the turn, would not
    see.
    """
    _register(transport)


class TurnWrites:
    """
    The adopted transports of one reactor and their writes due this turn.

    @ivar installed: the reactor's turns end with a flush.
    """

    installed = False

    def __init__(self) -> None:
        # Transports with bytes written this turn (a dict: ordered, unique).
        self._due: Dict[Any, None] = {}
        self._reactor: Any = None
        self._base: Optional[Type[Any]] = None
        self._adopted: Dict[Type[Any], Type[Any]] = {}
        # The descriptors the epoll reactor watches for writability: a
        # transport not among them needs no stopWriting (three calls into
        # the reactor to find that out, once per send); None on any other
        # reactor, which is asked each time.
        self._writing: Optional[Set[int]] = None
        # The epoll reactor's read event, while our poll runs it.
        self._readEvent = 0

    def install(self, reactor: Any, spin: float = 0.0) -> bool:
        """
        End each turn of C{reactor} with a flush; C{False}, and nothing
        changed, unless it is a Twisted posix reactor (epoll, poll, select).

        @param spin: on the epoll reactor, after a turn that handled socket
            events, poll without sleeping for up to this many seconds
            (never past the next timed call) before sleeping: an event that
            comes meanwhile (a destination's answer, the next request) is
            handled without the latency of a wakeup, for at most this much
            CPU each time the proxy goes idle. Only while events come that
            soon: once one came later, polls sleep at once until one comes
            within C{spin} of the poll again (distant destinations cost no
            spinning). 0: sleep at once.
        """
        if self.installed or not isinstance(reactor, posixbase.PosixReactorBase):
            return self.installed
        base, flush, due = type(reactor), self.flush, self._due
        # Our poll reads the epoll reactor's own members: a Twisted that
        # lacks one keeps its own poll (the tests would say so).
        ours = isinstance(reactor, epollreactor.EPollReactor) and all(
            hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite", "_writes")
        )
        poll: Callable[[Any, Optional[float], float], Optional[float]] = _poll if ours else _theirs(base)
        # The last turn handled events, and they came within spin.
        hot = near = False

        def doIteration(reactor: Any, timeout: Optional[float]) -> None:
            nonlocal hot, near
            # The writes of the timed calls just run, then those of the
            # events this iteration handles.
            if due:
                flush()
                # A close it did ran the protocol's connectionLost, which may
                # have scheduled a call: sleep no longer than that call allows
                # (the main loop's own reckoning).
                timeout = reactor.running and reactor.timeout()
            waited = poll(reactor, timeout, spin if hot and near else 0.0)
            hot = waited is not None
            if waited is not None:
                near = waited <= spin
            if due:
                flush()

        def startWriting(transport: Any) -> None:
            # New bytes, a close or a half-close: the flush's doWrite sends
            # the bytes first and then closes, as Twisted's would. (Waiting
            # for writability itself is wait_writable.)
            if self.installed and transport.connected and not transport.TLS:
                due[transport] = None
            else:
                _register(transport)

        def write(transport: Any, data: bytes) -> None:
            # Twisted's TLS-aware write, FileDescriptor.write, its producer
            # check and startWriting in one call (four calls a write, two
            # writes a kept-alive request). TLS started since adoption, and
            # anything but bytes (the TypeError), take Twisted's own.
            if transport.TLS or type(data) is not bytes:
                _write(transport, data)
            elif data and transport.connected and not transport._writeDisconnected:
                transport._tempDataBuffer.append(data)
                transport._tempDataLen += len(data)
                if (
                    transport.producer is not None
                    and transport.streamingProducer
                    and len(transport.dataBuffer) + transport._tempDataLen > transport.bufferSize
                ):
                    transport.producerPaused = True
                    transport.producer.pauseProducing()
                if self.installed:
                    due[transport] = None
                else:
                    _register(transport)

        # An adopted transport also closes its socket without the
        # shutdown(SHUT_RDWR) Twisted makes first, a system call per
        # connection that Twisted's own comment calls unnecessary: the
        # socket is close-on-exec, so this process holds its only
        # descriptor, and close() ends the connection the same way.
        members = {
            "startWriting": startWriting,
            "write": write,
            "doRead": _doRead,
            "_shouldShutdown": False,
            "__module__": __name__,
        }
        self._adopted = {kind: type(kind.__name__, (kind,), members) for kind in (tcp.Server, tcp.Client, Dialled)}
        self._reactor, self._base = reactor, base
        self._writing = cast(Set[int], getattr(reactor, "_writes")) if ours else None
        self._readEvent = epollreactor.EPOLLIN if ours else 0
        reactor.__class__ = type(base.__name__, (base,), {"doIteration": doIteration, "__module__": __name__})
        self.installed = True
        return True

    def uninstall(self) -> None:
        """
        Give the reactor its own turn back, after one last flush; adopted
        transports write through Twisted's path from then on.
        """
        if not self.installed:
            return
        self.installed = False
        self._reactor.__class__ = self._base
        self._reactor = self._base = None
        self.flush()

    def adopt(self, transport: Any) -> None:
        """
        Send C{transport}'s writes at the end of the turn, when it is a
        plain TCP connection and this is installed; leave any other as it is.
        """
        adopted = self._adopted.get(type(transport))
        if adopted is not None and self.installed and not transport.TLS:
            transport.__class__ = adopted

    def readNow(self, transport: Any) -> None:
        """
        Read C{transport}, an adopted connection just accepted, at once, as
        its read event would: a client that speaks first has mostly sent
        its request by the time its connection is accepted, which is then
        served in this turn rather than after the next wakeup (a poll and
        an event dispatch less before its first response byte). Nothing
        there yet: one C{recv} that finds nothing, and the event reads it.
        """
        if self._readEvent and self.installed and type(transport) in self._adopted.values():
            self._reactor._doReadOrWrite(transport, transport.fileno(), self._readEvent)

    def flush(self) -> None:
        """
        Send what each adopted transport wrote this turn and do the closes
        it asked for. What the kernel did not take goes to the reactor,
        whose write events send the rest; a failed send, an error and a
        finished close disconnect the transport as the reactor's own write
        event would.
        """
        due = list(self._due)
        self._due.clear()
        for transport in due:
            if not transport.connected:
                continue
            try:
                if transport.offset < len(transport.dataBuffer) or transport._tempDataLen > _SEND_LIMIT:
                    why = transport.doWrite()
                else:
                    why = _send(transport, self._writing)
            except Exception as e:
                _log.failure("writing to {transport}", transport=transport)
                why = e
            try:
                if why:
                    transport.reactor._disconnectSelectable(transport, why, False)
                elif transport._tempDataLen or len(transport.dataBuffer) > transport.offset:
                    _register(transport)
            except Exception:
                _log.failure("disconnecting {transport}", transport=transport)


def _theirs(base: Any) -> Callable[[Any, Optional[float], float], Optional[float]]:
    """
    The C{base} reactor class's own poll, which does not spin.
    """

    def poll(reactor: Any, timeout: Optional[float], spin: float) -> Optional[float]:
        base.doIteration(reactor, timeout)
        return None

    return poll


def _poll(reactor: Any, timeout: Optional[float], spin: float) -> Optional[float]:
    """
    C{EPollReactor.doPoll} without the logging context around each event,
    polling without sleeping for up to C{spin} seconds (not past
    C{timeout}) first. How long it waited for the events it handled;
    C{None}: there were none.
    """
    poller, size = reactor._poller, len(reactor._selectables)
    started = perf_counter()
    try:
        events = None
        if spin and (timeout is None or timeout > 0):
            wait = spin if timeout is None else min(spin, timeout)
            end = started + wait
            events = poller.poll(0, size)
            while not events and perf_counter() < end:
                events = poller.poll(0, size)
            if not events and timeout is not None:
                timeout -= wait
        if not events:
            events = poller.poll(-1 if timeout is None else timeout, size)
    except InterruptedError:
        return None
    if not events:
        return None
    waited = perf_counter() - started
    selectables, handle = reactor._selectables, reactor._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        if event != _IN or selectable.fileno() == -1:
            handle(selectable, fd, event)
            continue
        # Readable, nothing else: what the reactor's _doReadOrWrite does
        # with it, one call less per event.
        try:
            why = selectable.doRead()
        except BaseException as e:
            why = e
            _legacy.err()
        if why:
            reactor._disconnectSelectable(selectable, why, True)
    return waited


def _doRead(transport: Any) -> Any:
    """
    C{tcp.Connection.doRead} and its C{_dataReceived} in one call.
    """
    try:
        data = transport.socket.recv(transport.bufferSize)
    except OSError as e:
        return None if e.args[0] == errno.EWOULDBLOCK else main.CONNECTION_LOST
    if not data:
        return main.CONNECTION_DONE
    transport.protocol.dataReceived(data)
    return None


def _send(transport: Any, writing: Optional[Set[int]]) -> Any:
    """
    C{doWrite} for what one turn wrote, when nothing older waits: one
    send of it all, the rest (what the kernel did not take) left in the
    buffer for the reactor's write events; or, nothing written, the close
    or half-close that was asked for without an empty send first.
    C{writing}: the descriptors the reactor watches for writability, when
    known.
    """
    written = transport._tempDataBuffer
    if written:
        data = written[0] if len(written) == 1 else b"".join(written)
        transport._tempDataBuffer = []
        transport._tempDataLen = 0
        try:
            sent = transport.socket.send(data)
        except OSError as e:
            if e.errno not in _NOT_YET:
                return main.CONNECTION_LOST
            sent = 0
        if sent < len(data):
            transport.dataBuffer, transport.offset = data, sent
            return None
    # What doWrite does once its buffers are empty, without the empty send
    # it would make first: stop watching for writability (when watched),
    # resume a producer waiting for the buffer to drain, else do the close
    # or half-close that was asked for.
    if writing is None or transport.fileno() in writing:
        transport.stopWriting()
    if transport.producer is not None and (not transport.streamingProducer or transport.producerPaused):
        transport.producerPaused = False
        transport.producer.resumeProducing()
    elif transport.disconnecting:
        return transport._postLoseConnection()
    elif transport._writeDisconnecting:
        transport._writeDisconnected = True
        return transport._closeWriteConnection()
    return None


#: The process's own: L{codex_proxy.service.ProxyService} installs it on
#: the reactor when it owns the process (C{twistd codexproxy}).
TURN_WRITES = TurnWrites()
