"""
Ports in patterns (SPEC §3.1) and address ranges (SPEC §5.3), through the
listeners a client uses: the HTTP proxy (absolute-form and CONNECT), SOCKS5
TCP and UDP, and the pinned vetting of an intercepted tunnel.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.http import PUBLIC
from support.http import Harness as HTTPHarness
from support.socks import NO_AUTH, connect, datagram
from support.socks import Harness as SOCKSHarness

from codex_proxy import _socks5wire as wire
from codex_proxy.domains import DomainSet, PatternKind, parse_pattern
from codex_proxy.model import Protocol, ProxyRequest
from codex_proxy.policy import Policy
from codex_proxy.testing import StaticResolver

OTHER_PUBLIC = "198.51.99.7"  # just outside 198.51.100.0/24: public

RESOLVER = {
    "example.com": [PUBLIC],
    "ssh.example.com": [PUBLIC],
    "localhost": ["127.0.0.1"],
    "lo.corp.test": ["127.0.0.1"],
    "meta.corp.test": ["169.254.169.254"],
    "lo6.corp.test": ["::1"],
    "zero.corp.test": ["0.0.0.7"],
    "registry.corp.test": ["10.20.1.5", "10.20.7.9"],
    "half.corp.test": ["10.20.1.5", "10.0.0.7"],
    "cdn.corp.test": [PUBLIC, OTHER_PUBLIC],
}


def http(policy: Policy) -> HTTPHarness:
    return HTTPHarness(False, policy=policy, resolver=StaticResolver(RESOLVER))


def get(h: HTTPHarness, host: str, port: int) -> None:
    target = f"{host}:{port}"
    h.send(f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())


def tunnel(h: HTTPHarness, host: str, port: int) -> None:
    target = f"{host}:{port}"
    h.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())


def refusal(h: HTTPHarness) -> Dict[str, Any]:
    """
    The reply to a refused request: status, header and the JSON reason.
    """
    status, headers, body = h.response()
    return {
        "status": status,
        "x-proxy-error": headers.get("x-proxy-error"),
        "reason": json.loads(body)["reason"],
    }


def blocked(header: str, reason: str) -> Dict[str, Any]:
    return {"status": 403, "x-proxy-error": header, "reason": reason}


# -- ports in patterns -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, canonical, port",
    [
        ("Example.COM:443", "example.com:443", 443),
        ("**.example.com:8080", "**.example.com:8080", 8080),
        ("*.example.com:1", "*.example.com:1", 1),
        ("[::1]:9000", "[::1]:9000", 9000),
        ("[::1]", "::1", 0),
        ("::1", "::1", 0),
        ("127.1:5432", "127.0.0.1:5432", 5432),
        ("localhost:65535", "localhost:65535", 65535),
    ],
)
def test_pattern_with_port_is_canonical(text, canonical, port):
    pattern = parse_pattern(text)
    assert (pattern.text, pattern.port) == (canonical, port)
    assert parse_pattern(pattern.text) == pattern


def test_every_host_on_a_port_only_in_denylists():
    pattern = parse_pattern(" *:22 ", deny=True)
    assert (pattern.kind, pattern.text) == (PatternKind.EVERY_HOST, "*:22")


def test_a_pattern_with_a_port_matches_only_that_port():
    domains = DomainSet(
        parse_pattern(text, deny=True)
        for text in ["a.test:8000", "**.b.test:443", "*.c.test", "[::1]:9000", "*:22"]
    )
    assert domains.match("a.test", 8000).text == "a.test:8000"
    assert domains.match("a.test", 8001) is None
    assert domains.match("x.b.test", 443).text == "**.b.test:443"
    assert domains.match("b.test", 80) is None
    assert domains.match("x.c.test", 12345).text == "*.c.test"
    assert domains.match("::1", 9000).text == "[::1]:9000"
    assert domains.match("::1", 9001) is None
    assert domains.match("anything.test", 22).text == "*:22"
    assert domains.match("a.test", 22).text == "*:22"
    # Without a port only patterns for every port count.
    assert domains.match("a.test") is None
    assert domains.match("x.c.test").text == "*.c.test"
    assert domains.exact("a.test", 8000) and not domains.exact("a.test", 8001)


PORTS = st.integers(min_value=1, max_value=65535)


@given(pattern_port=PORTS, request_port=PORTS)
def test_port_patterns_match_exactly_their_port(pattern_port, request_port):
    domains = DomainSet(
        parse_pattern(text, deny=True)
        for text in (f"a.test:{pattern_port}", f"[::1]:{pattern_port}", f"*:{pattern_port}")
    )
    same = pattern_port == request_port
    assert (domains.match("a.test", request_port) is not None) is same
    assert (domains.match("::1", request_port) is not None) is same
    assert (domains.match("b.test", request_port) is not None) is same
    assert domains.match("a.test") is None


def test_star_port_denies_every_host_on_that_port_while_443_still_works():
    h = http(Policy.build(allowed=["**.example.com"], denied=["*:22"]))
    tunnel(h, "ssh.example.com", 22)
    assert refusal(h) == blocked("blocked-by-denylist", "denied")
    assert h.dials() == []
    h = http(Policy.build(allowed=["**.example.com"], denied=["*:22"]))
    tunnel(h, "example.com", 443)
    assert h.dials() == [(PUBLIC, 443)]
    h.accept()
    assert h.client.value().startswith(b"HTTP/1.1 200 ")


def test_star_port_denies_an_exactly_allowlisted_local_literal_too():
    h = http(Policy.build(allowed=["127.0.0.1"], denied=["*:22"]))
    get(h, "127.0.0.1", 22)
    assert refusal(h) == blocked("blocked-by-denylist", "denied")
    assert h.dials() == []


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_local_literal_with_port_unlocks_only_that_port(host):
    policy = Policy.build(allowed=[f"{host}:8000"])
    h = http(policy)
    get(h, host, 8000)
    assert h.dials() == [("127.0.0.1", 8000)]
    h = http(policy)
    get(h, host, 8001)
    assert refusal(h) == blocked("blocked-by-allowlist", "not_allowed_local")
    assert h.dials() == []


def test_bracketed_ipv6_literal_with_port_over_socks5():
    h = SOCKSHarness(False, policy=Policy.build(allowed=["[::1]:9000"]))
    h.send(NO_AUTH + connect("::1", 9000))
    assert h.dials() == [("::1", 9000)]
    other = h.connectClient(5556)
    h.send(NO_AUTH + connect("::1", 9001), other)
    assert other.transport.value()[2:4] == b"\x05\x02"
    assert h.dials() == [("::1", 9000)]


# -- address ranges ---------------------------------------------------------------

WIDE = ["127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "::/64", "::ffff:0:0/96"]


@pytest.mark.parametrize(
    "host",
    [
        "lo.corp.test",
        "meta.corp.test",
        "lo6.corp.test",
        "zero.corp.test",
        "127.0.0.1",
        "169.254.169.254",
        "[::1]",
        "[::ffff:127.0.0.1]",
    ],
)
def test_a_range_cannot_unlock_loopback_or_metadata(host):
    h = http(Policy.build(allowed=["**.corp.test"], allowed_ranges=WIDE))
    tunnel(h, host, 443)
    assert refusal(h) == blocked("blocked-by-allowlist", "not_allowed_local")
    assert h.dials() == []


def test_a_range_of_exactly_that_address_unlocks_it():
    h = http(Policy.build(allowed=["**.corp.test"], allowed_ranges=["127.0.0.1"]))
    tunnel(h, "lo.corp.test", 443)
    assert h.dials() == [("127.0.0.1", 443)]


def test_allowlisted_name_in_an_allowed_private_range_is_reachable():
    policy = Policy.build(allowed=["**.corp.test"], allowed_ranges=["10.20.0.0/16"])
    h = http(policy)
    tunnel(h, "registry.corp.test", 443)
    assert h.dials() == [("10.20.1.5", 443)]
    h.accept()
    assert h.client.value().startswith(b"HTTP/1.1 200 ")
    # The range widens the address check, never the allowlist.
    h = http(Policy.build(allowed=["other.test"], allowed_ranges=["10.20.0.0/16"]))
    tunnel(h, "registry.corp.test", 443)
    assert refusal(h) == blocked("blocked-by-allowlist", "not_allowed")
    assert h.resolver.lookups == [] and h.dials() == []


def test_a_literal_in_an_allowed_range_still_needs_the_allowlist():
    ranges = ["10.20.0.0/16"]
    h = http(Policy.build(allowed=["**.corp.test"], allowed_ranges=ranges))
    get(h, "10.20.1.5", 80)
    assert refusal(h) == blocked("blocked-by-allowlist", "not_allowed")
    h = http(Policy.build(allowed=["10.20.1.5:80"], allowed_ranges=ranges))
    get(h, "10.20.1.5", 80)
    assert h.dials() == [("10.20.1.5", 80)]


def test_one_private_answer_outside_the_allowed_range_refuses_the_name():
    h = http(Policy.build(allowed=["**.corp.test"], allowed_ranges=["10.20.0.0/16"]))
    tunnel(h, "half.corp.test", 443)
    assert refusal(h) == blocked("blocked-by-allowlist", "not_allowed_local")
    assert h.dials() == []


@pytest.mark.parametrize("allow_local_binding", [False, True])
def test_one_answer_in_a_denied_range_refuses_the_name(allow_local_binding):
    h = http(
        Policy.build(
            allowed=["**.corp.test"],
            denied_ranges=["198.51.99.0/24"],
            allowed_ranges=["198.51.99.7"],  # denied wins over allowed
            allow_local_binding=allow_local_binding,
        )
    )
    get(h, "cdn.corp.test", 80)
    assert refusal(h) == blocked("blocked-by-denylist", "denied")
    assert h.dials() == []
    [event] = h.auditor.events
    assert event["network.policy.reason"] == "denied"


def test_a_public_literal_in_a_denied_range_is_denied():
    h = http(Policy.build(allowed=[OTHER_PUBLIC], denied_ranges=["198.51.99.0/24"]))
    tunnel(h, OTHER_PUBLIC, 443)
    assert refusal(h) == blocked("blocked-by-denylist", "denied")
    assert h.dials() == []


def test_a_denied_range_catches_the_ipv4_an_ipv6_answer_embeds():
    resolver = StaticResolver({"mapped.corp.test": ["::ffff:198.51.99.7"]})
    policy = Policy.build(allowed=["**.corp.test"], denied_ranges=["198.51.99.0/24"])
    h = HTTPHarness(False, policy=policy, resolver=resolver)
    tunnel(h, "mapped.corp.test", 443)
    assert refusal(h) == blocked("blocked-by-denylist", "denied")


def test_socks5_tcp_applies_the_ranges():
    policy = Policy.build(
        allowed=["**.corp.test"],
        allowed_ranges=["10.20.0.0/16"],
        denied_ranges=["198.51.99.0/24"],
    )
    h = SOCKSHarness(False, policy=policy, resolver=StaticResolver(RESOLVER))
    h.send(NO_AUTH + connect("cdn.corp.test", 443))
    assert h.client.value()[2:4] == b"\x05\x02"
    other = h.connectClient(5556)
    h.send(NO_AUTH + connect("registry.corp.test", 443), other)
    assert h.dials() == [("10.20.1.5", 443)]
    assert h.reasons() == ["denied", "allowed"]


def test_every_udp_datagram_meets_the_ranges():
    policy = Policy.build(
        allowed=["**.corp.test"],
        allowed_ranges=["10.20.0.0/16"],
        denied_ranges=["198.51.99.0/24"],
    )
    h = SOCKSHarness(False, policy=policy, resolver=StaticResolver(RESOLVER))
    h.send(NO_AUTH + connect("0.0.0.0", 7000, wire.CMD_UDP_ASSOCIATE))
    proto = h.reactor.udp[0].protocol
    proto.datagramReceived(datagram("cdn.corp.test", 53, b"x"), ("127.0.0.1", 7000))
    assert h.reactor.udp[1:] == []
    proto.datagramReceived(datagram("registry.corp.test", 53, b"y"), ("127.0.0.1", 7000))
    assert h.reactor.udp[1].written == [(b"y", ("10.20.1.5", 53))]
    assert h.reasons() == ["denied", "allowed"]


def test_an_intercepted_tunnel_meets_the_ranges_of_a_reloaded_policy():
    h = http(Policy.build(allowed=["**.corp.test"], mitm=True))
    found: List[Any] = []
    request = ProxyRequest(Protocol.HTTPS_CONNECT, "cdn.corp.test", 443, method="CONNECT")
    h.service.check(request).addCallback(found.append)
    h.service.reload(Policy.build(allowed=["**.corp.test"], denied_ranges=["198.51.99.0/24"]))
    inner = ProxyRequest(Protocol.HTTPS, "cdn.corp.test", 443, method="GET")
    h.service.check_pinned(inner, found[0]).addCallback(found.append)
    assert [v.allowed for v in found] == [True, False]
    assert [e["network.policy.reason"] for e in h.auditor.events] == ["allowed", "denied"]
