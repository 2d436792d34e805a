"""
A connection another listener answered, handed to the HTTP listener's
intercepted-tunnel states: a SOCKS5 CONNECT that SPEC §6 or §12
intercepts is served as an intercepted HTTP CONNECT would be.
"""

from __future__ import annotations

from typing import Any

from codex_proxy._connection import ClientConnection
from codex_proxy.httpproxy import HTTPProxyFactory, HTTPProxyProtocol
from codex_proxy.model import Verdict
from codex_proxy.upstream import Outbound, Route


def intercept(
    factory: HTTPProxyFactory,
    previous: ClientConnection,
    verdict: Verdict,
    out: Outbound,
    route: Route,
    handshake: bytes,
) -> None:
    """
    Serve the connection of C{previous}, another listener's protocol that
    answered it, as an intercepted tunnel of C{factory}'s: TLS toward its
    client with a leaf for C{verdict}'s host, then inner requests decided
    as inside an intercepted CONNECT, for the client C{previous}
    authenticated as. C{handshake} is what the client sent after its own
    request. The connection stays registered and counted as C{previous}'s
    listener's (L{ClientConnection.takeOver}).
    """
    transport: Any = previous.transport
    tunnel = _HandedOver()
    tunnel.factory = factory
    tunnel.takeOver(previous)
    transport.protocol = tunnel
    tunnel.makeConnection(transport)
    tunnel.start(verdict, out, route, handshake)
    if previous.clientEOF:
        # Its client half-closed before the hand-over: as if now.
        tunnel.readConnectionLost()


class _HandedOver(HTTPProxyProtocol):
    """
    A connection another listener answered (L{intercept}): that listener's
    reply stands in for the C{200}, then TLS with a leaf for the requested
    host, then inner requests.
    """

    tunnelAnswer = b""
    # What its client sends now is TLS, read once the hand-over is done.
    speaksFirst = False

    def start(self, verdict: Verdict, out: Outbound, route: Route, handshake: bytes) -> None:
        """
        Start TLS toward the client on the answered connection.
        """
        self.abandon()  # connectionMade waits for a head: it comes inside TLS
        self.keep(handshake)
        transport: Any = self.transport
        transport.resumeProducing()
        self._intercept(verdict, out, route)
