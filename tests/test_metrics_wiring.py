"""
How L{codex_proxy.metrics.Metrics} is fed inside a proxy: a client
connection's opening, tunnel and outcome events, the decision and connect
latencies (a cancelled attempt is no measurement), and the audit log's
written and dropped lines. Everything in memory.
"""

from __future__ import annotations

import os
from ipaddress import ip_address
from typing import Any, List, Optional

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy.audit import JSONLinesLog
from codex_proxy.errors import UpstreamError
from codex_proxy.metrics import Metrics
from codex_proxy.model import Protocol, ProxyRequest
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.upstream import Upstream
from support.disk import FullDisk
from support.http import Harness, HalfCloseTransport
from support import socks
from support.metrics import value


def attached(h: Harness) -> Metrics:
    """
    Metrics fed by C{h}'s connections, and a fresh client connection (the
    harness's first one was accepted before anything listened).
    """
    metrics = Metrics(start_time=0.0)
    metrics.attach(h.auditor.sinks, h.factory.connections)
    h.proto = h.factory.buildProtocol(None)
    h.client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    h.proto.makeConnection(h.client)
    return metrics


def test_a_tunnel_is_counted_open_then_closed(trickle):
    h = Harness(trickle)
    metrics = attached(h)
    assert value(metrics, "codexproxy_connections_open", listener="http") == 1
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\nearly")
    server, _ = h.accept()
    assert value(metrics, "codexproxy_tunnels_open", listener="http") == 1
    h.answer(server, b"world")
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    assert value(metrics, "codexproxy_tunnels_open", listener="http") == 0
    assert value(metrics, "codexproxy_connections_open", listener="http") == 0
    ended = value(metrics, "codexproxy_connections_total", listener="http", outcome="closed")
    assert ended == 1
    assert value(metrics, "codexproxy_relayed_bytes_total", direction="up") == 5
    assert value(metrics, "codexproxy_relayed_bytes_total", direction="down") == 5
    assert value(
        metrics,
        "codexproxy_decisions_total",
        decision="allow",
        reason="allowed",
        protocol="https_connect",
        client="anonymous",
    ) == 1


def test_a_blocked_request_is_no_tunnel(trickle):
    h = Harness(trickle)
    metrics = attached(h)
    h.send(b"CONNECT bad.example.com:443 HTTP/1.1\r\nHost: bad.example.com:443\r\n\r\n")
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    assert value(metrics, "codexproxy_tunnels_open", listener="http") == 0
    ended = value(metrics, "codexproxy_connections_total", listener="http", outcome="blocked")
    assert ended == 1


@implementer(IHostnameResolver)
class HeldResolver:
    """
    Answers only when the test says so.
    """

    def __init__(self) -> None:
        self.receivers: List[Any] = []

    def resolveHostName(self, receiver: IResolutionReceiver, name: str, *args: Any, **kw: Any) -> Any:
        receiver.resolutionBegan(None)
        self.receivers.append(receiver)
        return receiver

    def answer(self, host: str) -> None:
        receiver = self.receivers.pop(0)
        receiver.addressResolved(IPv4Address("TCP", host, 0))
        receiver.resolutionComplete()


def service(observe: Any) -> tuple[PolicyService, HeldResolver, MemoryReactorClock]:
    resolver, clock = HeldResolver(), MemoryReactorClock()
    svc = PolicyService(
        Policy.build(allowed=["origin.test"]), resolver=resolver, clock=clock, observe=observe
    )
    return svc, resolver, clock


def request(host: str = "origin.test") -> ProxyRequest:
    return ProxyRequest(protocol=Protocol.HTTP, host=host, port=80, method="GET")


def test_decision_latency_runs_to_the_verdict():
    seen: List[float] = []
    svc, resolver, clock = service(seen.append)
    d = svc.check(request())
    clock.advance(0.25)
    assert seen == []
    resolver.answer("93.184.216.34")
    assert d.called and seen == [0.25]
    svc.check(request("blocked.example"))
    assert seen == [0.25, 0.0]


def test_a_cancelled_decision_is_not_measured():
    seen: List[float] = []
    svc, _, clock = service(seen.append)
    d = svc.check(request())
    clock.advance(1)
    d.cancel()
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    assert seen == []


def dial(seen: List[float]) -> tuple[MemoryReactorClock, "defer.Deferred[Any]"]:
    reactor = MemoryReactorClock()
    upstream = Upstream(reactor, 10, observe=seen.append)
    return reactor, upstream.connect([ip_address("93.184.216.34")], 443)


def test_connect_latency_success_and_failure():
    seen: List[float] = []
    reactor, d = dial(seen)
    reactor.advance(0.5)
    factory = reactor.tcpClients[0][2]
    factory.buildProtocol(None).makeConnection(HalfCloseTransport())
    assert d.called and seen == [0.5]
    reactor, failed = dial(seen)
    reactor.advance(2)
    reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    failed.addErrback(lambda f: f.trap(UpstreamError))
    assert seen == [0.5, 2.0]


def test_a_cancelled_dial_is_not_measured():
    seen: List[float] = []
    reactor, d = dial(seen)
    d.cancel()
    d.addErrback(lambda f: f.trap(defer.CancelledError, UpstreamError))
    assert seen == []


def audit_log(tmp_path: Any, room: Optional[int] = None) -> tuple[Metrics, JSONLinesLog]:
    metrics = Metrics(start_time=0.0)
    write = os.write if room is None else FullDisk(room)
    log = JSONLinesLog(str(tmp_path / "audit.jsonl"), MemoryReactorClock(), write=write)
    log.written, log.dropped = metrics.audit_written, metrics.audit_dropped
    log.open()
    return metrics, log


def test_audit_lines_written_and_dropped(tmp_path):
    metrics, log = audit_log(tmp_path)
    log({"n": 1})
    log({"n": 2})
    log.flush()
    assert value(metrics, "codexproxy_audit_lines_total", result="written") == 2
    full, failing = audit_log(tmp_path, room=0)
    failing({"n": 3})
    failing.flush()
    assert value(full, "codexproxy_audit_lines_total", result="dropped") == 1
    assert value(full, "codexproxy_audit_lines_total", result="written") == 0
    log.close()
    failing.close()


def test_histogram_buckets_are_less_or_equal():
    metrics = Metrics(start_time=0.0)
    metrics.observe_decision(0.001)
    metrics.observe_decision(100.0)
    assert value(metrics, "codexproxy_decision_seconds_bucket", le="0.0005") == 0
    assert value(metrics, "codexproxy_decision_seconds_bucket", le="0.001") == 1
    assert value(metrics, "codexproxy_decision_seconds_bucket", le="10.0") == 1
    assert value(metrics, "codexproxy_decision_seconds_bucket", le="+Inf") == 2
    assert value(metrics, "codexproxy_decision_seconds_count") == 2
    assert value(metrics, "codexproxy_decision_seconds_sum") == 100.001


def test_socks5_udp_payload_bytes_count_as_relayed_when_the_association_ends(trickle):
    # SPEC §13: every relayed byte, UDP included; the SOCKS5 UDP header is
    # the relay's own, not relayed.
    h = socks.Harness(trickle)
    metrics = Metrics(start_time=0.0)
    metrics.attach(h.auditor.sinks, h.factory.connections)
    h.proto = h.connectClient()
    h.client = h.proto.transport
    _, proto = socks.associate(h)
    proto.datagramReceived(socks.datagram("origin.test", 53, b"query"), ("127.0.0.1", 7000))
    proto.datagramReceived(socks.datagram("bad.example.com", 53, b"denied"), ("127.0.0.1", 7000))
    out = h.reactor.udp[1]
    out.protocol.datagramReceived(b"answer!", (socks.PUBLIC, 53))
    out.protocol.datagramReceived(b"spoofed", ("127.0.0.9", 53))
    assert value(metrics, "codexproxy_relayed_bytes_total", direction="up") == 0
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    assert value(metrics, "codexproxy_relayed_bytes_total", direction="up") == 5
    assert value(metrics, "codexproxy_relayed_bytes_total", direction="down") == 7
    ended = value(metrics, "codexproxy_connections_total", listener="socks5", outcome="closed")
    assert ended == 1
