"""
SOCKS5 decisions that go through the policy service like every other:
UDP ASSOCIATE refusals, destinations re-decided after a reload, hosts that
are no host names, and the proxy's own listening addresses.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any, List

import pytest
from twisted.internet import error
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from codex_proxy import _socks5wire as wire
from codex_proxy.config import Limits
from codex_proxy.model import Mode
from codex_proxy.policy import Policy
from codex_proxy.testing import MemoryUpstream
from support.socks import (
    ALLOW,
    NO_AUTH,
    PUBLIC,
    Harness,
    PendingResolver,
    associate,
    connect,
    datagram,
    reply,
)


def udp_associate(port: int = 0) -> bytes:
    return NO_AUTH + connect("0.0.0.0", port, wire.CMD_UDP_ASSOCIATE)


# -- UDP ASSOCIATE refusals ----------------------------------------------------


def test_udp_associate_refused_in_limited_mode_is_audited_once(trickle):
    h = Harness(trickle, policy=Policy.build(mode=Mode.LIMITED, allowed=ALLOW))
    h.send(b"\x05\x01\x02" + b"\x01\x05alice\x03pwd" + connect("0.0.0.0", 7000, 3))
    assert h.client.value() == b"\x05\x02\x01\x00" + reply(0x02)
    assert h.reactor.udp == []
    [event] = h.auditor.events
    assert event["network.policy.decision"] == "deny"
    assert event["network.policy.reason"] == "method_not_allowed"
    assert event["network.policy.source"] == "mode_guard"
    assert event["network.transport.protocol"] == "socks5_udp"
    assert event["client.address"] == "127.0.0.1:5555"
    assert event["client.identity"] == "alice"


def test_udp_associate_refused_for_max_udp_associations_is_audited_once(trickle):
    h = Harness(trickle, limits=Limits(max_udp_associations=1))
    h.send(udp_associate())
    assert h.auditor.events == []  # an allowed association is no destination
    second = h.connectClient(5556)
    h.send(udp_associate(), second)
    assert second.transport.value() == b"\x05\x00" + reply(0x01)
    [event] = h.auditor.events
    assert event["network.policy.decision"] == "deny"
    assert event["network.policy.reason"] == "too_many_udp_associations"
    assert event["network.policy.source"] == "proxy_state"
    assert event["network.transport.protocol"] == "socks5_udp"
    assert event["client.address"] == "127.0.0.1:5556"


def test_udp_associate_on_a_disabled_proxy_is_audited_once(trickle):
    h = Harness(trickle, policy=Policy.build(enabled=False, allowed=ALLOW))
    h.send(udp_associate())
    assert h.client.value() == b"\x05\x00" + reply(0x02)
    assert h.reasons() == ["proxy_disabled"]
    assert h.reactor.udp == []


# -- a reload reaches open associations ------------------------------------------


def test_reload_re_decides_an_open_association_s_destination(trickle):
    h = Harness(trickle)
    client_side, proto = associate(h)
    proto.datagramReceived(datagram("origin.test", 53, b"before"), ("127.0.0.1", 7000))
    out = h.reactor.udp[1]
    h.service.reload(Policy.build(allowed=["127.0.0.1"]))
    proto.datagramReceived(datagram("origin.test", 53, b"after"), ("127.0.0.1", 7000))
    proto.datagramReceived(datagram("origin.test", 53, b"again"), ("127.0.0.1", 7000))
    assert out.written == [(b"before", (PUBLIC, 53))]
    assert h.reasons() == ["allowed", "not_allowed"]
    # Nor does the destination reach the client any more.
    out.protocol.datagramReceived(b"late", (PUBLIC, 53))
    assert client_side.written == []
    # The association stays, for what the new policy allows.
    proto.datagramReceived(datagram("127.0.0.1", 53, b"z"), ("127.0.0.1", 7000))
    assert out.written[-1] == (b"z", ("127.0.0.1", 53))


def test_reload_allowing_a_destination_again_audits_it_again(trickle):
    h = Harness(trickle)
    _, proto = associate(h)
    proto.datagramReceived(datagram("origin.test", 53, b"1"), ("127.0.0.1", 7000))
    h.service.reload(Policy.build(allowed=ALLOW))
    proto.datagramReceived(datagram("origin.test", 53, b"2"), ("127.0.0.1", 7000))
    proto.datagramReceived(datagram("origin.test", 53, b"3"), ("127.0.0.1", 7000))
    assert [data for data, _ in h.reactor.udp[1].written] == [b"1", b"2", b"3"]
    assert h.reasons() == ["allowed", "allowed"]
    assert h.resolver.lookups == ["origin.test", "origin.test"]


def test_reload_while_a_destination_is_pending_re_decides_the_next_datagram(trickle):
    resolver = PendingResolver()
    h = Harness(trickle, resolver=resolver)
    _, proto = associate(h)
    proto.datagramReceived(datagram("origin.test", 53, b"1"), ("127.0.0.1", 7000))
    h.service.reload(Policy.build(allowed=["127.0.0.1"]))
    proto.datagramReceived(datagram("origin.test", 53, b"2"), ("127.0.0.1", 7000))
    # The new policy denied the destination at once, the datagram that
    # waited included; the earlier decision, started under the old policy,
    # was abandoned unaudited.
    resolver.answer(PUBLIC)
    assert h.reasons() == ["not_allowed"]
    assert h.reactor.udp[1:] == []
    assert h.reactor.getDelayedCalls() == []


def test_datagrams_waiting_across_a_reload_go_out_under_the_new_decision(trickle):
    resolver = PendingResolver()
    h = Harness(trickle, resolver=resolver)
    _, proto = associate(h)
    proto.datagramReceived(datagram("origin.test", 53, b"1"), ("127.0.0.1", 7000))
    h.service.reload(Policy.build(allowed=ALLOW))
    proto.datagramReceived(datagram("origin.test", 53, b"2"), ("127.0.0.1", 7000))
    resolver.answer(PUBLIC)  # the abandoned lookup: nothing follows from it
    assert h.reactor.udp[1:] == [] and h.auditor.events == []
    resolver.answer(PUBLIC)
    assert h.reactor.udp[1].written == [(b"1", (PUBLIC, 53)), (b"2", (PUBLIC, 53))]
    assert h.reasons() == ["allowed"]


# -- hosts that are no host names ------------------------------------------------


def domain_request(name: str, port: int = 80) -> bytes:
    raw = name.encode("utf-8")
    return b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + port.to_bytes(2, "big")


@pytest.mark.parametrize(
    "unsafe", ["\r", "\n", "\x1b[2J", "\x00", "\u2028", "\u0085"], ids=repr
)
def test_control_characters_of_a_domain_never_reach_the_log_text(trickle, unsafe):
    h = Harness(trickle)
    name = f"origin.test{unsafe}fake log line"
    with capturedLogs() as events:
        h.send(NO_AUTH + domain_request(name))
    assert h.client.value() == b"\x05\x00" + reply(0x01)
    assert h.reasons() == ["invalid_host"]
    assert h.auditor.events[0]["server.address"] == name  # the JSON log escapes it
    lines = [formatEvent(event) for event in events]
    assert any("fake log line" in line for line in lines)
    for line in lines:
        for char in ("\r", "\n", "\x1b", "\x00", "\u2028", "\u0085"):
            assert char not in line


@pytest.mark.parametrize(
    "name",
    [
        "origin.test:443",
        "origin.test:",
        "[2001:4860::8888]:443",
        " origin.test",
        "origin.test\t",
    ],
)
def test_a_domain_that_is_no_bare_host_name_is_invalid(trickle, name):
    h = Harness(trickle)
    h.send(NO_AUTH + domain_request(name, 443))
    assert h.client.value() == b"\x05\x00" + reply(0x01)
    assert h.reasons() == ["invalid_host"]
    assert h.dials() == [] and h.resolver.lookups == []


def test_a_udp_destination_with_a_port_in_its_name_is_invalid(trickle):
    h = Harness(trickle)
    _, proto = associate(h)
    name = b"origin.test:53"
    header = b"\x00\x00\x00\x03" + bytes([len(name)]) + name + (53).to_bytes(2, "big")
    proto.datagramReceived(header + b"x", ("127.0.0.1", 7000))
    assert h.reasons() == ["invalid_host"]
    assert h.reactor.udp[1:] == [] and h.resolver.lookups == []


@pytest.mark.parametrize("name", ["2001:4860::8888", "[2001:4860::8888]"])
def test_an_ipv6_literal_sent_as_a_domain_is_still_judged_as_the_address(trickle, name):
    h = Harness(trickle)
    h.send(NO_AUTH + domain_request(name, 443))
    assert h.dials() == [("2001:4860::8888", 443)]


# -- the proxy never dials itself (SPEC §4.2b) -------------------------------------


def test_connect_to_the_proxy_s_own_address_is_not_allowed_local(trickle):
    h = Harness(trickle, policy=Policy.build(allowed=ALLOW, allow_local_binding=True))
    h.service.set_own_addresses([("127.0.0.1", 1080), ("127.0.0.1", 3128)])
    h.send(NO_AUTH + connect("127.0.0.1", 1080))
    assert h.client.value() == b"\x05\x00" + reply(0x02)
    assert h.reasons() == ["not_allowed_local"]
    assert h.dials() == []
    other = h.connectClient(5556)
    h.send(NO_AUTH + connect("127.0.0.1", 8080), other)
    assert h.dials() == [("127.0.0.1", 8080)]


def test_udp_datagram_to_the_proxy_s_own_address_is_dropped(trickle):
    h = Harness(trickle)
    h.service.set_own_addresses([("0.0.0.0", 1080)])
    _, proto = associate(h)
    proto.datagramReceived(datagram("127.0.0.1", 1080, b"loop"), ("127.0.0.1", 7000))
    assert h.reasons() == ["not_allowed_local"]
    assert h.reactor.udp[1:] == []


# -- one outcome event per connection ----------------------------------------------


def outcomes_of(h: Harness) -> List[Any]:
    seen: List[Any] = []
    h.factory.connections.observers.append(seen.append)
    return seen


def test_a_relayed_connection_ends_with_one_outcome(trickle):
    h = Harness(trickle)
    seen = outcomes_of(h)
    h.send(NO_AUTH + connect("origin.test", 443) + b"early")
    server, _ = h.accept()
    h.send(b"ping")
    server.dataReceived(b"pong!")
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    [outcome] = seen
    assert (outcome.listener, outcome.client, outcome.decision, outcome.outcome) == (
        "socks5",
        "127.0.0.1:5555",
        "allow",
        "closed",
    )
    assert (outcome.bytes_up, outcome.bytes_down) == (9, 5)


@pytest.mark.parametrize(
    "send, then, outcome, reason",
    [
        (NO_AUTH + connect("elsewhere.test", 443), None, "blocked", "not_allowed"),
        (NO_AUTH + connect("origin.test", 443), "refuse", "failed", "upstream_refused"),
        (NO_AUTH + connect("127.0.0.1", 80, wire.CMD_BIND), None, "bad_request", None),
        (NO_AUTH, "wait", "timeout", None),
    ],
)
def test_every_ending_is_one_outcome(trickle, send, then, outcome, reason):
    h = Harness(trickle)
    seen = outcomes_of(h)
    h.send(send)
    if then == "refuse":
        h.fail(error.ConnectionRefusedError())
    elif then == "wait":
        h.reactor.advance(5)
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    [ended] = seen
    assert (ended.outcome, ended.reason) == (outcome, reason)


def test_an_association_ends_with_one_allowed_outcome(trickle):
    h = Harness(trickle)
    seen = outcomes_of(h)
    associate(h)
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    [ended] = seen
    assert (ended.decision, ended.outcome) == ("allow", "closed")


def test_a_udp_relay_that_cannot_be_bound_is_general_failure(trickle):
    h = Harness(trickle)
    seen = outcomes_of(h)

    def cannot(*args: Any, **kwargs: Any) -> Any:
        raise error.CannotListenError("127.0.0.1", 0, OSError(98, "in use"))

    h.reactor.listenUDP = cannot  # type: ignore[method-assign]
    with capturedLogs() as events:
        h.send(udp_associate())
    assert h.client.value() == b"\x05\x00" + reply(0x01)
    assert h.factory.associations == 0
    assert any("cannot open a SOCKS5 UDP relay" in formatEvent(e) for e in events)
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    assert [ended.outcome for ended in seen] == ["error"]


def test_bytes_behind_a_udp_associate_never_stop_the_control_connection():
    h = Harness(False)
    h.send(udp_associate() + b"x" * (1 << 17))
    assert h.client.producerState == "producing"
    h.proto.readConnectionLost()
    assert h.client.disconnecting


@pytest.mark.parametrize(
    "policy, reason",
    [
        (Policy.build(mode=Mode.LIMITED, allowed=ALLOW), "method_not_allowed"),
        (Policy.build(enabled=False, allowed=ALLOW), "proxy_disabled"),
    ],
)
def test_reload_to_limited_mode_or_disabled_stops_an_open_association(policy, reason):
    h = Harness(False)
    _, proto = associate(h)
    proto.datagramReceived(datagram("origin.test", 53, b"1"), ("127.0.0.1", 7000))
    h.service.reload(policy)
    proto.datagramReceived(datagram("origin.test", 53, b"2"), ("127.0.0.1", 7000))
    assert [data for data, _ in h.reactor.udp[1].written] == [b"1"]
    assert h.reasons() == ["allowed", reason]


# -- any upstream connector ----------------------------------------------------------


def test_the_listener_dials_through_any_upstream_connector(trickle):
    h = Harness(trickle)
    upstream = h.factory.upstream = MemoryUpstream()
    h.send(NO_AUTH + connect("origin.test", 443) + b"hello")
    [(route, _)] = upstream.dials
    assert (route.addresses, route.port) == ((ip_address(PUBLIC),), 443)
    out, destination = upstream.accept()
    assert destination.value() == b"hello"
    out.dataReceived(b"world")
    assert h.client.value().endswith(b"world")
    other = h.connectClient(5556)
    h.send(NO_AUTH + connect("origin.test", 443), other)
    upstream.refuse()
    assert other.transport.value() == b"\x05\x00" + reply(0x05)


# -- interception (SPEC §6) ------------------------------------------------------


def test_intercepted_connect_without_mitm_machinery_is_refused_and_never_dialled(trickle):
    """
    A listener built without the HTTP listener's interception cannot
    intercept: the CONNECT the policy wants intercepted fails closed (REP
    0x01) instead of becoming an opaque tunnel.
    """
    h = Harness(trickle, policy=Policy.build(mode=Mode.LIMITED, mitm=True, allowed=ALLOW))
    with capturedLogs() as events:
        h.send(NO_AUTH + connect("origin.test", 443))
    assert h.client.value() == b"\x05\x00" + reply(0x01)
    assert h.dials() == []
    assert any("no MITM configured" in formatEvent(e) for e in events)
