"""
The DNS listener of SPEC §14.2 on in-memory transports: answers for allowed
names from the vetted resolution with TTL 0, REFUSED for names not allowed
(never looked up), for refused answers and for other query types, SERVFAIL
on resolver failure, one audit event per decided query.
"""

from __future__ import annotations

import socket
from typing import List, Optional, Tuple

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names import dns

from codex_proxy.connections import Connections
from codex_proxy.dnsserver import DNSFactory
from codex_proxy.model import Mode
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.testing import RecordingAuditor, StaticResolver

CLIENT = ("127.0.0.1", 40000)


class Datagrams:
    """
    Stands in for the UDP transport: records every datagram written.
    """

    def __init__(self) -> None:
        self.sent: List[Tuple[bytes, Tuple[str, int]]] = []

    def write(self, data: bytes, address: Tuple[str, int]) -> None:
        self.sent.append((data, address))


def serve(
    resolver: StaticResolver, connections: Optional[Connections] = None, **policy
) -> tuple[DNSFactory, RecordingAuditor]:
    clock = MemoryReactorClock()
    auditor = RecordingAuditor(clock.seconds)
    policy.setdefault("allowed", ["**.example.com"])
    service = PolicyService(Policy.build(**policy), resolver=resolver, clock=clock, auditor=auditor)
    return DNSFactory(service, Connections() if connections is None else connections), auditor


def ask(factory: DNSFactory, name: str, kind: int = dns.A, cls: int = dns.IN) -> dns.Message:
    """
    One query over UDP; returns the decoded reply.
    """
    protocol = factory.datagram()
    transport = Datagrams()
    protocol.makeConnection(transport)
    query = dns.Message(id=7, recDes=1)
    query.queries = [dns.Query(name, kind, cls)]
    protocol.datagramReceived(query.toStr(), CLIENT)
    [(data, address)] = transport.sent
    assert address == CLIENT
    reply = dns.Message()
    reply.fromStr(data)
    assert (reply.id, reply.answer) == (7, 1)
    return reply


def test_allowed_name_is_answered_from_the_vetted_resolution_with_ttl_0():
    resolver = StaticResolver({"a.example.com": ["203.0.114.1", "2001:4860::8"]})
    factory, auditor = serve(resolver)

    a = ask(factory, "a.example.com")
    aaaa = ask(factory, "a.example.com", dns.AAAA)

    assert a.rCode == dns.OK
    assert [(rr.payload.dottedQuad(), rr.ttl, rr.payload.ttl) for rr in a.answers] == [
        ("203.0.114.1", 0, 0)
    ]
    assert aaaa.rCode == dns.OK
    assert [
        (str(rr.name), socket.inet_ntop(socket.AF_INET6, rr.payload.address), rr.ttl)
        for rr in aaaa.answers
    ] == [("a.example.com", "2001:4860::8", 0)]
    assert [
        (e["network.transport.protocol"], e["network.policy.decision"], e["server.address"])
        for e in auditor.events
    ] == [("dns", "allow", "a.example.com"), ("dns", "allow", "a.example.com")]


def test_name_not_allowed_is_refused_and_never_looked_up():
    resolver = StaticResolver({"unlisted.test": ["203.0.114.1"]})
    factory, auditor = serve(resolver)

    assert ask(factory, "unlisted.test").rCode == dns.EREFUSED
    assert resolver.lookups == []
    [event] = auditor.events
    assert (event["network.policy.decision"], event["network.policy.reason"]) == (
        "deny",
        "not_allowed",
    )


@pytest.mark.parametrize("private", ["10.0.0.5", "127.0.0.1", "::ffff:192.168.1.1"])
def test_name_resolving_to_a_private_address_is_refused(private):
    resolver = StaticResolver({"a.example.com": ["203.0.114.1", private]})
    factory, auditor = serve(resolver)

    assert ask(factory, "a.example.com").rCode == dns.EREFUSED
    assert auditor.events[-1]["network.policy.reason"] == "not_allowed_local"


def test_resolver_failure_is_servfail():
    factory, auditor = serve(StaticResolver({}))

    assert ask(factory, "gone.example.com").rCode == dns.ESERVER
    assert auditor.events[-1]["network.policy.reason"] == "upstream_dns_failed"


@pytest.mark.parametrize("kind, cls", [(dns.TXT, dns.IN), (dns.MX, dns.IN), (dns.A, dns.CH)])
def test_other_query_types_are_refused_without_a_lookup(kind, cls):
    resolver = StaticResolver({"a.example.com": ["203.0.114.1"]})
    factory, auditor = serve(resolver)

    assert ask(factory, "a.example.com", kind, cls).rCode == dns.EREFUSED
    assert resolver.lookups == []


def test_denied_and_disabled_are_refused():
    resolver = StaticResolver({"a.example.com": ["203.0.114.1"]})
    denied, _ = serve(resolver, denied=["a.example.com"])
    disabled, _ = serve(resolver, enabled=False)

    assert ask(denied, "a.example.com").rCode == dns.EREFUSED
    assert ask(disabled, "a.example.com").rCode == dns.EREFUSED
    assert resolver.lookups == []


def test_limited_mode_still_answers_lookups():
    resolver = StaticResolver({"a.example.com": ["203.0.114.1"]})
    factory, _ = serve(resolver, mode=Mode.LIMITED)

    assert [rr.payload.dottedQuad() for rr in ask(factory, "a.example.com").answers] == [
        "203.0.114.1"
    ]


def test_queries_over_tcp_are_answered_too():
    resolver = StaticResolver({"a.example.com": ["203.0.114.1"]})
    connections = Connections()
    factory, auditor = serve(resolver, connections)
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
    protocol.makeConnection(transport)
    assert len(connections) == 1  # a shutdown closes it with the rest
    query = dns.Message(id=9)
    query.queries = [dns.Query("a.example.com", dns.A, dns.IN)]
    data = query.toStr()
    protocol.dataReceived(len(data).to_bytes(2, "big") + data)

    written = transport.value()
    reply = dns.Message()
    reply.fromStr(written[2:])
    assert int.from_bytes(written[:2], "big") == len(written) - 2
    assert [rr.payload.dottedQuad() for rr in reply.answers] == ["203.0.114.1"]
    assert auditor.events[-1]["client.address"] == "127.0.0.1:40001"
    protocol.connectionLost(None)
    assert len(connections) == 0


def test_only_patterns_for_every_port_decide_a_lookup():
    resolver = StaticResolver(
        {"api.example.com": ["203.0.114.1"], "port.example.org": ["203.0.114.2"]}
    )
    factory, auditor = serve(
        resolver,
        allowed=["**.example.com", "port.example.org:443"],
        denied=["*:53", "api.example.com:25"],
    )

    assert ask(factory, "api.example.com").rCode == dns.OK
    assert ask(factory, "port.example.org").rCode == dns.EREFUSED
    assert resolver.lookups == ["api.example.com"]
    assert [
        (e["network.policy.decision"], e["network.policy.reason"], e["server.port"])
        for e in auditor.events
    ] == [("allow", "allowed", 0), ("deny", "not_allowed", 0)]
