"""
The client-connection layer the listeners share (L{codex_proxy._connection})
and the interfaces between the HTTP listener's parts: each implementer is
checked with C{verifyObject}; each connection ends with one outcome event.
"""

from __future__ import annotations

from typing import List

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass, verifyObject

from codex_proxy._exchange import Exchange, IExchangeOwner, Leg
from codex_proxy._pipelining import IHeadOwner
from codex_proxy.connections import ConnectionOutcome
from codex_proxy.relay import Relay
from codex_proxy.upstream import ISink
from support.http import HalfCloseTransport, Harness

GET = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n"


def test_the_listener_provides_what_its_parts_call():
    h = Harness(False)
    verifyObject(IExchangeOwner, h.proto)
    verifyObject(IHeadOwner, h.proto)
    for sink in (Exchange, Leg, Relay):
        verifyClass(ISink, sink)


def test_a_refused_connection_reports_its_refusal(trickle):
    h = Harness(trickle)
    h.factory.connections.max_clients = 0
    seen: List[ConnectionOutcome] = []
    h.factory.connections.observers.append(seen.append)
    h.proto = h.factory.buildProtocol(None)
    h.client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5556))
    h.proto.makeConnection(h.client)
    h.send(GET)
    assert h.response()[0] == 503 and h.client.disconnecting
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    [outcome] = seen
    assert (outcome.decision, outcome.reason, outcome.outcome) == ("deny", "too_many_connections", "blocked")


def test_a_tunnel_reports_the_bytes_it_relayed(trickle):
    h = Harness(trickle)
    seen: List[ConnectionOutcome] = []
    h.factory.connections.observers.append(seen.append)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    server, _ = h.accept()
    h.send(b"12345")
    h.answer(server, b"abc")
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    [outcome] = seen
    assert (outcome.decision, outcome.outcome, outcome.bytes_up, outcome.bytes_down) == ("allow", "closed", 5, 3)
