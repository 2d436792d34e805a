"""
A TCP dial on a posix reactor without Twisted's client connector.

C{reactor.connectTCP} builds a connector, starts and stops a factory,
schedules the connect for the next turn, and registers the socket for
reading and writing, then unregisters and registers it again once it is
connected: about 17 CPU us per dial, a twentieth of a CONNECT tunnel's
whole cost (C{bench/cpu_per_request.py --only connect}). L{Connecting} does
what a dial needs: a non-blocking C{connect}, one registration for
writability, the socket's error once writable, and a Twisted TCP transport
(L{Dialled}) for the connected socket, which the reactor then reads like
any other. A dial whose outcome is known as C{connect} returns (on
loopback, always) settles at once, before the caller's next line.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable, Optional

from twisted.internet import defer, error, tcp
from twisted.internet.interfaces import IDelayedCall, IProtocol, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy.addresses import authority


_log = Logger()

#: Where the system has it, a socket is made non-blocking as it is made,
#: without a second system call.
_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)


class Dialled(tcp.Server):
    """
    The transport of a connection we dialled: a Twisted TCP connection
    built from its connected socket (as C{adoptStreamConnection} builds
    one, without duplicating the socket), whose TLS, when started, is the
    client side.
    """

    _tlsClientDefault = True

    def __init__(self, sock: socket.socket, protocol: IProtocol, peer: tuple[Any, ...], reactor: Any) -> None:
        super().__init__(sock, protocol, peer, None, 0, reactor)  # type: ignore[arg-type]
        self._kind = type(protocol).__name__
        self._peer = peer

    def __repr__(self) -> str:
        # Written only when logged: not worked out per dial.
        return f"<{self._kind} to {authority(self._peer[0], self._peer[1])}>"


def _outcome(sock: socket.socket) -> Optional[int]:
    """
    How a non-blocking connect that is in progress stands: 0 connected, an
    errno failed, C{None} still under way. On loopback the handshake (or
    the refusal) is over by the time C{connect} returns: known at once, it
    saves a registration for writability, a timer and a reactor turn.
    """
    try:
        sock.getpeername()
    except OSError:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or None
    return 0


@implementer(IWriteDescriptor)
class Connecting:
    """
    One dial of C{host}:C{port} (an IP literal): its C{deferred} fires with
    the protocol C{build} made once it is connected, or fails as a Twisted
    client's would (C{ConnectionRefusedError}, C{TimeoutError}, another
    C{ConnectError}); cancelling it closes the socket.

    @param build: makes the connection's protocol, given what to call once
        that protocol's C{connectionMade} ran.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        timeout: float,
        build: Callable[[Callable[[Any], None]], IProtocol],
    ) -> None:
        self._reactor = reactor
        self._build = build
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._peer: tuple[Any, ...] = (host, port) if family == socket.AF_INET else (host, port, 0, 0)
        self.deferred: defer.Deferred[Any] = defer.Deferred(self._cancel)
        # Until it has fired (or was cancelled).
        self._waiting: Optional[defer.Deferred[Any]] = self.deferred
        self._timer: Optional[IDelayedCall] = None
        self._sock: Optional[socket.socket] = None
        self._registered = False
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
        except OSError as e:
            # No socket to be had (out of descriptors, no IPv6).
            self._fire(Failure(error.ConnectError(e.errno, e.strerror)))
            return
        self._sock = sock
        if not _NONBLOCK:
            sock.setblocking(False)
        try:
            code = sock.connect_ex(self._peer)
        except OSError as e:
            # An address the socket cannot take (an IPv6 scope it lacks).
            self._fail(Failure(error.ConnectError(string=str(e))))
            return
        if code in (errno.EINPROGRESS, errno.EWOULDBLOCK):
            outcome = _outcome(sock)
            if outcome is None:
                reactor.addWriter(self)
                self._registered = True
                self._timer = reactor.callLater(timeout, self._timedOut)
                return
            code = outcome
        self._settle()
        self._finish(sock, code, None)

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        return "Connecting"

    def doWrite(self) -> None:
        """
        Writable: connected, or failed (the socket's error says which).
        """
        self._connected(None)

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor saw the socket fail (a refused connection) or is
        shutting down: the socket's error, if any, says why.
        """
        self._connected(reason)

    def _connected(self, lost: Optional[Failure]) -> None:
        sock = self._settle()
        if sock is None:
            return
        self._finish(sock, sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), lost)

    def _finish(self, sock: socket.socket, code: int, lost: Optional[Failure]) -> None:
        """
        The dial is over: C{sock} connected unless C{code} (its error) or
        C{lost} says otherwise.
        """
        if code or lost is not None:
            sock.close()
            self._fire(Failure(error.getConnectError((code, os.strerror(code)))) if code else lost)
            return
        # The protocol's connectionMade fires the Deferred.
        protocol = self._build(self._fire)
        transport = Dialled(sock, protocol, self._peer, self._reactor)
        try:
            protocol.makeConnection(transport)
        except Exception:
            # The connection that nothing will use is closed, as Twisted's
            # connector would; the dial fails, so that its caller answers
            # rather than waits.
            transport.abortConnection()
            _log.failure("the protocol of a dialled connection failed to start")
            self._fire(Failure(error.ConnectError(string="the connection's protocol failed to start")))

    def _settle(self) -> Optional[socket.socket]:
        """
        Stop waiting: unregister, cancel the timeout; the socket, if still
        held, for the caller to use or close.
        """
        if self._registered:
            # While fileno() still names the socket: the reactor finds a
            # selectable by its descriptor at once, but searches all of
            # them for one whose fileno() is -1.
            self._registered = False
            self._reactor.removeWriter(self)
        sock, self._sock = self._sock, None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        return sock

    def _fail(self, failure: Failure) -> None:
        sock = self._settle()
        if sock is not None:
            sock.close()
        self._fire(failure)

    def _fire(self, result: Any) -> None:
        deferred, self._waiting = self._waiting, None
        if deferred is None:
            return
        if isinstance(result, Failure):
            deferred.errback(result)
        else:
            deferred.callback(result)

    def _timedOut(self) -> None:
        self._timer = None
        self._fail(Failure(error.TimeoutError()))

    def _cancel(self, deferred: object) -> None:
        # Deferred.cancel fails the Deferred with CancelledError after this.
        self._waiting = None
        sock = self._settle()
        if sock is not None:
            sock.close()
