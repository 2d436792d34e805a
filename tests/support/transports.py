"""
In-memory stand-ins for the transports the listeners are given, each
providing the Twisted interface of the real one (checked with
C{verifyObject} in C{tests/test_testing.py}).
"""

from __future__ import annotations

from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer


@implementer(ITCPTransport)
class TCPTransport(StringTransport):
    """
    A C{StringTransport} that is a TCP connection: it records a write-side
    half-close in C{halfClosed} and an abort in C{aborted}; TCP options are
    kept, not applied.
    """

    halfClosed = False
    aborted = False
    noDelay = False
    keepAlive = False

    def loseWriteConnection(self) -> None:
        self.halfClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def getTcpNoDelay(self) -> bool:
        return self.noDelay

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.keepAlive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepAlive = enabled
