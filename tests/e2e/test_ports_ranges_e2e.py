"""
Port rules and address ranges in a real C{twistd codexproxy} (SPEC §3.1,
§5.3), driven by curl: C{localhost:PORT} opens a dev server on exactly that
port, C{*:PORT} closes one port for every host, and an allowed range of
exactly one loopback address (never a wider one) lets a name pinned there
with C{--resolve} through.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from conftest import OriginServer


@pytest.fixture
def other_origin() -> Iterator[OriginServer]:
    """
    A second loopback origin, on another port: what a rule must not open.
    """
    server = OriginServer().start()
    yield server
    server.stop()


def _blocked(result, header: str, reason: str) -> None:
    assert result.status == 403, result
    assert result.headers["x-proxy-error"] == header
    assert result.json()["reason"] == reason


def test_localhost_port_rule_opens_only_that_port(proxy_factory, origin, other_origin, curl):
    proxy = proxy_factory(
        {
            "allowed_domains": [f"localhost:{origin.port}"],
            "enable_socks5": True,
            "socks_url": "127.0.0.1:0",
        }
    )
    socks = f"socks5h://{proxy.ports['socks']}"
    for via in (proxy.http_url, socks):
        reached = curl.run(origin.url("/dev", host="localhost"), proxy=via)
        assert (reached.returncode, reached.status) == (0, 200), reached.stderr
    assert curl.run(origin.url("/dev", host="127.0.0.1"), proxy=proxy.http_url).status == 403
    refused = curl.run(other_origin.url("/other", host="localhost"), proxy=proxy.http_url)
    _blocked(refused, "blocked-by-allowlist", "not_allowed_local")
    over_socks = curl.run(other_origin.url("/other", host="localhost"), proxy=socks)
    assert over_socks.returncode != 0 and over_socks.status == 0
    assert [seen.path for seen in origin.requests] == ["/dev", "/dev"]
    assert other_origin.requests == []


def test_star_port_denies_every_host_on_that_port(proxy_factory, origin, other_origin, curl):
    proxy = proxy_factory(
        {
            "allowed_domains": ["127.0.0.1", "localhost"],
            "denied_domains": [f"*:{other_origin.port}"],
        }
    )
    for host in ("127.0.0.1", "localhost"):
        refused = curl.run(other_origin.url("/", host=host), proxy=proxy.http_url)
        _blocked(refused, "blocked-by-denylist", "denied")
    assert curl.run(origin.url("/", host="localhost"), proxy=proxy.http_url).status == 200
    assert other_origin.requests == []


@pytest.mark.parametrize(
    "allowed_ranges, denied_ranges, refusal",
    [
        (["127.0.0.1"], [], None),
        (["127.0.0.0/8"], [], ("blocked-by-allowlist", "not_allowed_local")),
        (["127.0.0.1"], ["127.0.0.0/8"], ("blocked-by-denylist", "denied")),
    ],
    ids=["exact-address", "wide-range", "denied-wins"],
)
def test_name_pinned_to_loopback_needs_a_range_of_exactly_that_address(
    proxy_factory, origin, curl, allowed_ranges, denied_ranges, refusal
):
    proxy = proxy_factory(
        {
            "allowed_domains": [f"dev.ranges.test:{origin.port}"],
            "allowed_ranges": allowed_ranges,
            "denied_ranges": denied_ranges,
        },
        args=("--resolve", "dev.ranges.test=127.0.0.1"),
    )
    result = curl.run(origin.url("/registry", host="dev.ranges.test"), proxy=proxy.http_url)
    if refusal is None:
        assert (result.status, result.body) == (200, b"hello from origin /registry\n")
        assert len(origin.requests) == 1
    else:
        _blocked(result, *refusal)
        assert origin.requests == []
