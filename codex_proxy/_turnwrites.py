"""
Writes sent at the end of the reactor's turn.

Twisted's C{transport.write} buffers the bytes and registers the socket
for writability; the next turn sends them and unregisters it: two
C{epoll_ctl} calls, one more wakeup and two event dispatches for each
write, about an eighth of a kept-alive request's cost. Once
L{TurnWrites.install}ed on the process's reactor, a plain TCP transport
that is L{TurnWrites.adopt}ed has what it writes sent by one flush at the
end of the turn, after every event of the turn was handled, so a turn's
writes still leave together, as they would from the next turn's wakeup.
Only the common case changes: what the kernel does not take at once, a
failed send, a close, a half-close and TLS keep Twisted's own path.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

from twisted.internet import abstract, posixbase, tcp
from twisted.logger import Logger

_log = Logger()

_register = abstract.FileDescriptor.startWriting


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

    def install(self, reactor: Any) -> bool:
        """
        End each turn of C{reactor} with a flush; C{False}, and nothing
        changed, unless it is a Twisted posix reactor (epoll, poll, select).
        """
        if self.installed or not isinstance(reactor, posixbase.PosixReactorBase):
            return self.installed
        base, flush, due = type(reactor), self.flush, self._due

        def doIteration(reactor: Any, timeout: Optional[float]) -> None:
            # The writes of the timed calls just run, then those of the
            # events this iteration handles.
            if due:
                flush()
            base.doIteration(reactor, timeout)
            if due:
                flush()

        def startWriting(transport: Any) -> None:
            # Nothing new buffered is a close asking to be flushed (which
            # loseConnection asks before it sets disconnecting).
            if (
                not transport._tempDataLen
                or not self.installed
                or transport.disconnecting
                or transport._writeDisconnecting
                or transport.TLS
            ):
                _register(transport)
            else:
                due[transport] = None

        self._adopted = {
            kind: type(kind.__name__, (kind,), {"startWriting": startWriting, "__module__": __name__})
            for kind in (tcp.Server, tcp.Client)
        }
        self._reactor, self._base = reactor, base
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

    def flush(self) -> None:
        """
        Send what each adopted transport wrote this turn. What is left, a
        failure and a close go to the reactor, whose next C{doWrite} sends
        the rest or reports them.
        """
        due = list(self._due)
        self._due.clear()
        for transport in due:
            if not transport.connected:
                continue
            try:
                result = transport.doWrite()
            except Exception:
                _log.failure("writing to {transport}", transport=transport)
                result = True
            if result is not None or transport._tempDataLen or len(transport.dataBuffer) > transport.offset:
                _register(transport)


#: The process's own: L{codex_proxy.service.ProxyService} installs it on
#: the reactor when it owns the process (C{twistd codexproxy}).
TURN_WRITES = TurnWrites()
