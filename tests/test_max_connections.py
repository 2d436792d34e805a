"""
limits.max_connections (SPEC §2.6): client connections of both listeners
count against one limit; beyond it an HTTP request is answered 503
C{proxy-overloaded} and a SOCKS5 request REP 0x01, each with one
C{proxy_state} audit event, and the connection is closed. Each wire case
is run whole and one byte at a time.
"""

from __future__ import annotations

import json

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from codex_proxy import _socks5wire as wire
from codex_proxy.httpproxy import HTTPProxyFactory
from codex_proxy.connections import Connections
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.socks5 import SOCKS5Factory
from codex_proxy.testing import RecordingAuditor, StaticResolver
from codex_proxy.upstream import Upstream

PUBLIC = "203.0.114.10"
GET = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n"
SOCKS_CONNECT = b"\x05\x01\x00" + b"\x05\x01\x00\x03\x0borigin.test\x01\xbb"


class World:
    """
    Both listeners sharing one L{Connections} that admits C{limit} clients.
    """

    def __init__(self, trickle: bool, limit: int) -> None:
        self.trickle = trickle
        self.reactor = MemoryReactorClock()
        self.auditor = RecordingAuditor(self.reactor.seconds)
        service = PolicyService(
            Policy.build(allowed=["origin.test"]),
            resolver=StaticResolver({"origin.test": [PUBLIC]}),
            clock=self.reactor,
            auditor=self.auditor,
        )
        self.connections = Connections(max_clients=limit)
        upstream = Upstream(self.reactor, 10, self.connections)
        self.http = HTTPProxyFactory(
            service, upstream, self.reactor, connections=self.connections
        )
        self.socks = SOCKS5Factory(
            service, upstream, self.reactor, connections=self.connections
        )
        self.port = 5000

    def connect(self, factory):
        self.port += 1
        proto = factory.buildProtocol(None)
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 3128),
            peerAddress=IPv4Address("TCP", "127.0.0.1", self.port),
        )
        proto.makeConnection(transport)
        return proto, transport

    def send(self, proto, data: bytes) -> None:
        if self.trickle:
            for i in range(len(data)):
                proto.dataReceived(data[i : i + 1])
        else:
            proto.dataReceived(data)

    def lose(self, proto, transport) -> None:
        proto.connectionLost(Failure(error.ConnectionDone()))

    def refusals(self):
        return [
            (e["network.transport.protocol"], e["network.policy.reason"], e["network.policy.source"], e["network.policy.scope"])
            for e in self.auditor.events
            if e["network.policy.decision"] == "deny"
        ]


def test_http_beyond_the_limit_gets_503_and_an_audit_event(trickle):
    w = World(trickle, limit=2)
    first = w.connect(w.http)
    w.connect(w.socks)
    proto, transport = w.connect(w.http)
    w.send(proto, GET)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"x-proxy-error: proxy-overloaded" in head
    assert b"Connection: close" in head
    answer = json.loads(body)
    assert (answer["reason"], answer["source"], answer["host"]) == (
        "too_many_connections",
        "proxy_state",
        "origin.test",
    )
    assert transport.disconnecting
    assert w.reactor.tcpClients == []  # nothing dialled
    assert w.refusals() == [("http", "too_many_connections", "proxy_state", "non_domain")]
    # Once an admitted client leaves, the next one is served again.
    w.lose(proto, transport)
    w.lose(*first)
    proto, transport = w.connect(w.http)
    w.send(proto, GET)
    assert transport.value() == b""
    assert [(h, p) for h, p, *_ in w.reactor.tcpClients] == [(PUBLIC, 80)]
    assert w.connections.clients == 2


def test_socks_beyond_the_limit_gets_0x01_and_an_audit_event(trickle):
    w = World(trickle, limit=1)
    w.connect(w.http)
    proto, transport = w.connect(w.socks)
    w.send(proto, SOCKS_CONNECT)
    assert transport.value() == wire.encode_method(wire.METHOD_NO_AUTH) + wire.encode_reply(0x01)
    assert transport.disconnecting
    assert w.reactor.tcpClients == []
    assert w.refusals() == [("socks5_tcp", "too_many_connections", "proxy_state", "non_domain")]


def test_refused_connections_do_not_count_and_are_closed_by_shutdown(trickle):
    w = World(trickle, limit=1)
    w.connect(w.http)
    for _ in range(3):
        w.connect(w.http)
    assert w.connections.clients == 1
    assert len(w.connections) == 4
