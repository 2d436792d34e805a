"""
L{codex_proxy.testing.MemoryUpstream}: it provides the upstream connector's
interface, like L{codex_proxy.upstream.Upstream}, and an embedder can drive
the HTTP listener with it.
"""

from __future__ import annotations

from ipaddress import ip_address

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from codex_proxy.httpproxy import HTTPProxyFactory
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.testing import MemoryUpstream, RecordingAuditor, StaticResolver
from codex_proxy.upstream import IUpstream, Upstream

PUBLIC = "203.0.114.10"


def test_both_connectors_provide_the_interface():
    verifyObject(IUpstream, MemoryUpstream())
    verifyObject(IUpstream, Upstream(MemoryReactorClock()))


def proxy(upstream: MemoryUpstream):
    reactor = MemoryReactorClock()
    service = PolicyService(
        Policy.build(allowed=["origin.test"]),
        resolver=StaticResolver({"origin.test": [PUBLIC]}),
        clock=reactor,
        auditor=RecordingAuditor(reactor.seconds),
    )
    proto = HTTPProxyFactory(service, upstream, reactor).buildProtocol(None)
    client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    proto.makeConnection(client)
    return proto, client


def test_an_exchange_through_the_memory_upstream():
    upstream = MemoryUpstream()
    proto, client = proxy(upstream)
    proto.dataReceived(b"GET http://origin.test/x HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    [(route, _)] = upstream.dials
    assert (route.addresses[0].exploded, route.port) == (PUBLIC, 80)
    out, destination = upstream.accept()
    assert destination.value().startswith(b"GET /x HTTP/1.1\r\n")
    out.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.value().endswith(b"\r\n\r\nok")


def test_a_refused_dial_and_a_withdrawn_one():
    upstream = MemoryUpstream()
    proto, client = proxy(upstream)
    proto.dataReceived(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    upstream.refuse()
    assert b"x-proxy-error: upstream-connect-failed\r\n" in client.value()
    proto, client = proxy(upstream)
    proto.dataReceived(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert upstream.dials == []


def test_a_dial_logs_nothing():
    """
    Each outbound connection used to log "Starting factory" and "Stopping
    factory": two log lines per CONNECT or request.
    """
    reactor = MemoryReactorClock()
    Upstream(reactor).connect([ip_address("127.0.0.1")], 8080)
    ((_, _, factory, *_),) = reactor.tcpClients
    logged: list = []
    globalLogPublisher.addObserver(logged.append)
    try:
        factory.doStart()
        factory.doStop()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert logged == []


def test_a_refused_dial_names_each_address_tried_last():
    reactor = MemoryReactorClock()
    d = Upstream(reactor).connect([ip_address("127.0.0.1"), ip_address("::1")], 8080)
    failures: list = []
    d.addErrback(failures.append)
    for attempt in (0, 1):
        host, port, factory, *_ = reactor.tcpClients[attempt]
        assert (host, port) == (["127.0.0.1", "::1"][attempt], 8080)
        factory.clientConnectionFailed(reactor.connectors[attempt], Failure(error.ConnectionRefusedError()))
    [failure] = failures
    assert (failure.value.reason.value, failure.value.message) == (
        "upstream_refused", "[::1]:8080 refused the connection"
    )
