"""
The SOCKS5 listener over in-memory transports: every REP code and state,
each wire case run once whole and once fed one byte at a time; and the UDP
relay of an association over fake UDP ports.
"""

from __future__ import annotations

import pytest
from twisted.internet import error
from twisted.python.failure import Failure

from codex_proxy import _socks5wire as wire
from codex_proxy._connection import PENDING_LIMIT
from codex_proxy.config import Limits
from codex_proxy.model import Mode
from codex_proxy.policy import Policy
from codex_proxy.relay import IdleWatch, Timer
from codex_proxy.testing import StaticResolver
from support.socks import (
    PUBLIC,
    PUBLIC6,
    ALLOW,
    NO_AUTH,
    associate,
    connect,
    datagram,
    PendingResolver,
    Harness,
    reply,
)


# -- CONNECT ------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, dialled",
    [("origin.test", (PUBLIC, 443)), ("127.0.0.1", ("127.0.0.1", 443)), (PUBLIC6, (PUBLIC6, 443))],
)
def test_connect_relays_both_ways(trickle, host, dialled):
    h = Harness(trickle)
    h.send(NO_AUTH + connect(host, 443) + b"early")
    assert h.client.value() == b"\x05\x00"
    assert h.dials() == [dialled]
    server, upstream = h.accept()
    # BND is the outbound socket's local address.
    assert h.client.value() == b"\x05\x00" + reply(0, "127.0.0.1", 61000)
    assert upstream.value() == b"early"
    h.send(b"ping")
    assert upstream.value() == b"earlyping"
    server.dataReceived(b"pong")
    assert h.client.value().endswith(b"pong")
    [event] = h.auditor.events
    assert event["network.transport.protocol"] == "socks5_tcp"
    assert event["network.policy.decision"] == "allow"
    assert event["client.address"] == "127.0.0.1:5555"
    assert "client.identity" not in event


def test_both_legs_of_a_tunnel_forward_at_once_without_nagle(trickle):
    h = Harness(trickle)
    h.send(NO_AUTH + connect("origin.test", 443))
    server, upstream = h.accept()
    assert (h.client.noDelay, upstream.noDelay) == (True, True)


def test_half_close_and_close_pass_through(trickle):
    h = Harness(trickle)
    h.send(NO_AUTH + connect("127.0.0.1", 80))
    server, upstream = h.accept()
    h.proto.readConnectionLost()
    assert upstream.halfClosed
    server.connectionLost(Failure(error.ConnectionDone()))
    assert h.client.disconnecting


def test_username_is_the_client_identity(trickle):
    h = Harness(trickle)
    h.send(b"\x05\x02\x00\x02" + b"\x01\x05alice\x03pwd" + connect("127.0.0.1", 80))
    assert h.client.value() == b"\x05\x02\x01\x00"
    [event] = h.auditor.events
    assert event["client.identity"] == "alice"
    assert "pwd" not in repr(event)
    assert h.dials() == [("127.0.0.1", 80)]


def test_no_acceptable_method(trickle):
    h = Harness(trickle)
    h.send(b"\x05\x02\x01\x80")
    assert h.client.value() == b"\x05\xff"
    assert h.client.disconnecting


def test_not_socks5_is_closed_silently(trickle):
    h = Harness(trickle)
    h.send(b"GET / HTTP/1.1\r\n\r\n")
    assert h.client.value() == b""
    assert h.client.disconnecting


def test_bad_auth_version_fails_the_subnegotiation(trickle):
    h = Harness(trickle)
    h.send(b"\x05\x01\x02" + b"\x02\x01a\x01b")
    assert h.client.value() == b"\x05\x02\x01\x01"
    assert h.client.disconnecting


@pytest.mark.parametrize(
    "request_, code",
    [
        (connect("127.0.0.1", 80, wire.CMD_BIND), 0x07),
        (connect("127.0.0.1", 80, 0x09), 0x07),
        (b"\x05\x01\x00\x02\x00\x00", 0x08),
        (b"\x05\x01\x00\x07", 0x08),
        (b"\x05\x01\x05\x01", 0x01),
    ],
    ids=["bind", "unknown-command", "atyp-2", "atyp-7", "reserved-byte"],
)
def test_unsupported_requests(trickle, request_, code):
    h = Harness(trickle)
    h.send(NO_AUTH + request_)
    assert h.client.value() == b"\x05\x00" + reply(code)
    assert h.client.disconnecting
    assert h.dials() == []
    assert h.auditor.events == []


def test_udp_associate_disabled_is_command_not_supported(trickle):
    h = Harness(trickle, enable_udp=False)
    h.send(NO_AUTH + connect("127.0.0.1", 0, wire.CMD_UDP_ASSOCIATE))
    assert h.client.value() == b"\x05\x00" + reply(0x07)
    assert h.reactor.udp == []


@pytest.mark.parametrize(
    "host, port, reason, code",
    [
        ("elsewhere.test", 443, "not_allowed", 0x02),
        ("bad.example.com", 443, "denied", 0x02),
        ("10.1.2.3", 443, "not_allowed_local", 0x02),
        ("localhost", 443, "not_allowed_local", 0x02),
        ("origin.test", 0, "invalid_host", 0x01),
        ("", 443, "invalid_host", 0x01),
    ],
)
def test_blocked_connect_is_never_resolved_nor_dialled(trickle, host, port, reason, code):
    h = Harness(trickle)
    h.send(NO_AUTH + connect(host, port))
    assert h.client.value() == b"\x05\x00" + reply(code)
    assert h.client.disconnecting
    assert h.dials() == []
    assert h.resolver.lookups == []
    assert h.reasons() == [reason]


def test_disabled_proxy_is_not_allowed(trickle):
    h = Harness(trickle, policy=Policy.build(enabled=False, allowed=ALLOW))
    h.send(NO_AUTH + connect("origin.test", 443))
    assert h.client.value() == b"\x05\x00" + reply(0x02)
    assert h.reasons() == ["proxy_disabled"]


def test_limited_mode_blocks_connect_and_udp(trickle):
    policy = Policy.build(mode=Mode.LIMITED, allowed=ALLOW)
    h = Harness(trickle, policy=policy)
    h.send(NO_AUTH + connect("origin.test", 443))
    assert h.client.value() == b"\x05\x00" + reply(0x02)
    assert h.reasons() == ["method_not_allowed"]
    udp = h.connectClient(5556)
    h.send(NO_AUTH + connect("127.0.0.1", 0, wire.CMD_UDP_ASSOCIATE), udp)
    assert udp.transport.value() == b"\x05\x00" + reply(0x02)
    assert h.dials() == [] and h.reactor.udp == []


def test_name_with_a_private_answer_is_not_allowed(trickle):
    h = Harness(trickle, resolver=StaticResolver({"origin.test": [PUBLIC, "10.0.0.7"]}))
    h.send(NO_AUTH + connect("origin.test", 443))
    assert h.client.value() == b"\x05\x00" + reply(0x02)
    assert h.dials() == []


@pytest.mark.parametrize(
    "failure, code",
    [
        (error.ConnectionRefusedError(), 0x05),
        (error.TimeoutError(), 0x06),
        (error.NoRouteError(), 0x04),
    ],
)
def test_dial_failures(trickle, failure, code):
    h = Harness(trickle)
    h.send(NO_AUTH + connect("origin.test", 443))
    h.fail(failure)
    assert h.client.value() == b"\x05\x00" + reply(code)
    assert h.client.disconnecting


def test_dns_failure_is_host_unreachable(trickle):
    h = Harness(trickle)
    h.send(NO_AUTH + connect("nowhere.example.com", 443))
    assert h.client.value() == b"\x05\x00" + reply(0x04)
    assert h.reasons() == ["upstream_dns_failed"]


def test_dns_timeout_is_host_unreachable(trickle):
    h = Harness(trickle, resolver=PendingResolver())
    h.send(NO_AUTH + connect("origin.test", 443))
    h.reactor.advance(10)
    assert h.client.value() == b"\x05\x00" + reply(0x04)


def test_client_leaving_while_deciding_cancels_the_decision(trickle):
    resolver = PendingResolver()
    h = Harness(trickle, resolver=resolver)
    h.send(NO_AUTH + connect("origin.test", 443))
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    resolver.answer(PUBLIC)
    assert h.dials() == []
    assert h.reactor.getDelayedCalls() == []


def test_client_leaving_while_dialling_stops_the_dial(trickle):
    h = Harness(trickle)
    h.send(NO_AUTH + connect("origin.test", 443))
    connector = h.reactor.connectors[-1]
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    assert connector.stoppedConnecting


def test_handshake_timeout_closes(trickle):
    h = Harness(trickle)
    h.send(NO_AUTH + connect("origin.test", 443)[:4])
    h.reactor.advance(4.9)
    assert not h.client.aborted
    h.reactor.advance(0.2)
    assert h.client.aborted
    assert h.dials() == []


def test_handshake_timer_stops_with_the_request(trickle):
    h = Harness(trickle)
    h.send(NO_AUTH + connect("origin.test", 443))
    h.accept()
    h.reactor.advance(30)
    assert not h.client.aborted


def test_eof_inside_the_handshake_closes(trickle):
    h = Harness(trickle)
    h.send(NO_AUTH)
    h.proto.readConnectionLost()
    assert h.client.disconnecting
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    assert h.reactor.getDelayedCalls() == []


# -- UDP ASSOCIATE ---------------------------------------------------------------


def test_udp_echo_through_the_relay(trickle):
    h = Harness(trickle)
    client_side, proto = associate(h)
    proto.datagramReceived(datagram("origin.test", 53, b"query"), ("127.0.0.1", 7000))
    out = h.reactor.udp[1]
    assert out.interface == "0.0.0.0"
    assert out.written == [(b"query", (PUBLIC, 53))]
    out.protocol.datagramReceived(b"answer", (PUBLIC, 53))
    assert client_side.written == [
        (wire.encode_datagram(PUBLIC, 53, b"answer"), ("127.0.0.1", 7000))
    ]
    [event] = h.auditor.events
    assert (event["network.transport.protocol"], event["network.policy.decision"]) == (
        "socks5_udp",
        "allow",
    )


def test_udp_decides_each_destination_once(trickle):
    h = Harness(trickle)
    _, proto = associate(h)
    for payload in (b"1", b"2"):
        proto.datagramReceived(datagram("origin.test", 53, payload), ("127.0.0.1", 7000))
    assert [data for data, _ in h.reactor.udp[1].written] == [b"1", b"2"]
    assert h.resolver.lookups == ["origin.test"]
    assert len(h.auditor.events) == 1


def test_udp_denied_destination_is_dropped_and_audited(trickle):
    h = Harness(trickle)
    _, proto = associate(h)
    proto.datagramReceived(datagram("blocked.invalid", 53, b"x"), ("127.0.0.1", 7000))
    proto.datagramReceived(datagram("blocked.invalid", 53, b"y"), ("127.0.0.1", 7000))
    assert h.reactor.udp[1:] == []
    assert h.resolver.lookups == []
    assert h.reasons() == ["not_allowed"]
    assert h.auditor.events[0]["network.transport.protocol"] == "socks5_udp"
    # The association stays usable.
    proto.datagramReceived(datagram("127.0.0.1", 53, b"z"), ("127.0.0.1", 7000))
    assert h.reactor.udp[1].written == [(b"z", ("127.0.0.1", 53))]
    assert not h.client.disconnecting


def test_udp_unresolvable_destination_is_dropped(trickle):
    h = Harness(trickle)
    _, proto = associate(h)
    proto.datagramReceived(datagram("nowhere.example.com", 53, b"x"), ("127.0.0.1", 7000))
    assert h.reactor.udp[1:] == []
    assert h.reasons() == ["upstream_dns_failed"]


def test_udp_datagrams_wait_for_a_pending_decision(trickle):
    resolver = PendingResolver()
    h = Harness(trickle, resolver=resolver)
    _, proto = associate(h)
    proto.datagramReceived(datagram("origin.test", 53, b"1"), ("127.0.0.1", 7000))
    proto.datagramReceived(datagram("origin.test", 53, b"2"), ("127.0.0.1", 7000))
    assert h.reactor.udp[1:] == []
    resolver.answer(PUBLIC)
    assert h.reactor.udp[1].written == [(b"1", (PUBLIC, 53)), (b"2", (PUBLIC, 53))]


@pytest.mark.parametrize(
    "data, source",
    [
        (datagram("127.0.0.1", 53, b"x"), ("127.0.0.2", 7000)),
        (datagram("127.0.0.1", 53, b"x"), ("127.0.0.1", 7001)),
        (datagram("127.0.0.1", 53, b"x", frag=1), ("127.0.0.1", 7000)),
        (b"\x00\x00\x00\x09junk", ("127.0.0.1", 7000)),
    ],
    ids=["other-ip", "other-port", "fragment", "bad-header"],
)
def test_udp_drops_foreign_and_malformed_datagrams(trickle, data, source):
    h = Harness(trickle)
    _, proto = associate(h)
    proto.datagramReceived(data, source)
    assert h.reactor.udp[1:] == []
    assert h.auditor.events == []


def test_udp_declared_port_zero_locks_on_the_first_source(trickle):
    h = Harness(trickle)
    client_side, proto = associate(h, declared_port=0)
    proto.datagramReceived(datagram("127.0.0.1", 53, b"a"), ("127.0.0.1", 9000))
    proto.datagramReceived(datagram("127.0.0.1", 53, b"b"), ("127.0.0.1", 9001))
    out = h.reactor.udp[1]
    assert out.written == [(b"a", ("127.0.0.1", 53))]
    out.protocol.datagramReceived(b"r", ("127.0.0.1", 53))
    assert client_side.written[-1][1] == ("127.0.0.1", 9000)


def test_udp_replies_only_from_destinations_sent_to(trickle):
    h = Harness(trickle)
    client_side, proto = associate(h)
    proto.datagramReceived(datagram("127.0.0.1", 53, b"q"), ("127.0.0.1", 7000))
    out = h.reactor.udp[1]
    out.protocol.datagramReceived(b"spoof", ("127.0.0.1", 54))
    out.protocol.datagramReceived(b"spoof", ("127.0.0.9", 53))
    assert client_side.written == []


def test_udp_association_ends_with_its_tcp_connection(trickle):
    h = Harness(trickle)
    _, proto = associate(h)
    proto.datagramReceived(datagram("127.0.0.1", 53, b"q"), ("127.0.0.1", 7000))
    h.send(b"ignored bytes on the control connection")
    assert not h.client.disconnecting
    h.proto.readConnectionLost()
    assert h.client.disconnecting
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    assert [port.listening for port in h.reactor.udp] == [False, False]
    assert h.factory.associations == 0


def test_udp_client_leaving_cancels_pending_decisions(trickle):
    resolver = PendingResolver()
    h = Harness(trickle, resolver=resolver)
    _, proto = associate(h)
    proto.datagramReceived(datagram("origin.test", 53, b"1"), ("127.0.0.1", 7000))
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    resolver.answer(PUBLIC)
    assert h.reactor.udp[1:] == []
    assert h.reactor.getDelayedCalls() == []


def test_max_udp_associations_is_general_failure(trickle):
    h = Harness(trickle, limits=Limits(max_udp_associations=1))
    associate(h)
    second = h.connectClient(5556)
    h.send(NO_AUTH + connect("0.0.0.0", 0, wire.CMD_UDP_ASSOCIATE), second)
    assert second.transport.value() == b"\x05\x00" + reply(0x01)
    assert len(h.reactor.udp) == 1
    # Ending the first frees its slot.
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    third = h.connectClient(5557)
    h.send(NO_AUTH + connect("0.0.0.0", 0, wire.CMD_UDP_ASSOCIATE), third)
    assert third.transport.value()[:5] == b"\x05\x00\x05\x00\x00"


def test_a_tunnel_watches_idleness_on_the_connections_one_timer(trickle):
    h = Harness(trickle, limits=Limits(socks_handshake_timeout_s=5, tunnel_idle_s=3600))
    scheduled: list = []
    real = h.reactor.callLater
    h.reactor.callLater = lambda *a, **kw: (scheduled.append(a[1]), real(*a, **kw))[1]
    h.send(NO_AUTH + connect("127.0.0.1", 443))
    server, upstream = h.accept()
    h.send(b"ping")
    assert upstream.value() == b"ping"
    assert [f for f in scheduled if isinstance(getattr(f, "__self__", None), (IdleWatch, Timer))] == []
    h.reactor.pump([900] * 4)
    assert not h.client.disconnecting
    h.reactor.pump([900])
    assert h.client.disconnecting


def test_bytes_sent_while_the_request_is_decided_open_the_tunnel_and_are_bounded(trickle):
    resolver = PendingResolver()
    h = Harness(trickle, resolver=resolver)
    h.send(NO_AUTH + connect("origin.test", 443))
    # Reading goes on (no epoll calls to pause and resume it) ...
    h.send(b"hello")
    assert h.client.producerState == "producing"
    resolver.answer(PUBLIC)
    server, upstream = h.accept()
    assert upstream.value() == b"hello"
    # ... and a client that floods while its request waits is paused.
    h2 = Harness(trickle, resolver=PendingResolver())
    h2.send(NO_AUTH + connect("origin.test", 443))
    h2.send(b"x" * PENDING_LIMIT)
    assert h2.client.producerState == "paused"
