"""
SOCKS5 decisions that go through the policy service like every other:
UDP ASSOCIATE refusals, destinations re-decided after a reload, hosts that
are no host names, and the proxy's own listening addresses.
"""

from __future__ import annotations

from typing import Any, Tuple

from twisted.python.failure import Failure
from twisted.internet import error

from codex_proxy import _socks5wire as wire
from codex_proxy.config import Limits
from codex_proxy.model import Mode
from codex_proxy.policy import Policy
from support.socks import ALLOW, NO_AUTH, PUBLIC, Harness, connect


def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return wire.encode_reply(code, host, port)


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
