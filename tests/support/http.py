"""
The HTTP listener's in-memory harness: a proxy factory over a memory reactor,
a client transport that records half-closes and C{startTLS}, and helpers to
accept, refuse and answer the dials it makes.
"""


from __future__ import annotations

from typing import List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy._httpbody import HeadLimits
from codex_proxy.httpproxy import HTTPProxyFactory, HTTPProxyProtocol
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.testing import RecordingAuditor, StaticResolver
from codex_proxy.upstream import Upstream
from support.transports import TCPTransport

PUBLIC = "203.0.114.10"  # not in any special range: a public address
ALLOW = ["origin.test", "**.example.com", "127.0.0.1"]


@implementer(ITLSTransport)
class HalfCloseTransport(TCPTransport):
    """
    A L{TCPTransport} that also records C{startTLS}.
    """

    tls = None

    def startTLS(self, creator) -> None:
        self.tls = creator


class Harness:
    def __init__(
        self,
        trickle: bool,
        policy: Optional[Policy] = None,
        resolver=None,
        limits: HeadLimits = HeadLimits(),
        client: Optional[StringTransport] = None,
    ) -> None:
        self.trickle = trickle
        self.reactor = MemoryReactorClock()
        self.resolver = resolver or StaticResolver(
            {"origin.test": [PUBLIC], "private.example.com": [PUBLIC, "10.0.0.7"]}
        )
        self.auditor = RecordingAuditor(self.reactor.seconds)
        self.service = PolicyService(
            policy or Policy.build(allowed=ALLOW, denied=["bad.example.com"]),
            resolver=self.resolver,
            clock=self.reactor,
            auditor=self.auditor,
        )
        self.factory = HTTPProxyFactory(
            self.service, Upstream(self.reactor, 10), self.reactor, limits, tunnel_idle=60
        )
        self.proto: HTTPProxyProtocol = self.factory.buildProtocol(None)
        self.client = client or HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        self.proto.makeConnection(self.client)

    def reconnect(self) -> None:
        """
        A new client connection to the same listener: C{send} and
        C{response} use it from now on.
        """
        self.proto = self.factory.buildProtocol(None)
        self.client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5556))
        self.proto.makeConnection(self.client)

    def send(self, data: bytes) -> None:
        if self.trickle:
            for i in range(len(data)):
                self.proto.dataReceived(data[i : i + 1])
        else:
            self.proto.dataReceived(data)
        self.turn()

    def turn(self) -> None:
        """
        Let the reactor run what is due now (pipelined requests are read
        from the reactor, not from inside the previous reply).
        """
        self.reactor.advance(0)

    def dials(self) -> List[Tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def accept(self, index: int = -1) -> Tuple[object, HalfCloseTransport]:
        """
        Complete the pending dial: the destination accepted.
        """
        factory = self.reactor.tcpClients[index][2]
        proto = factory.buildProtocol(None)
        transport = HalfCloseTransport()
        proto.makeConnection(transport)
        return proto, transport

    def refuse(self, reason: Exception, index: int = -1) -> None:
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(None, Failure(reason))

    def answer(self, server, data: bytes) -> None:
        if self.trickle:
            for i in range(len(data)):
                server.dataReceived(data[i : i + 1])
        else:
            server.dataReceived(data)
        self.turn()

    def response(self) -> Tuple[int, dict, bytes]:
        raw = self.client.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        return status, headers, body
