"""
--resolve: entry parsing, the table resolver in front of the reactor's, the
twistd option, and vetting of its answers like any DNS answer.
"""

from __future__ import annotations

import ipaddress
from typing import List

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from codex_proxy.api import NetworkProxy
from codex_proxy.config import parse_config
from codex_proxy.model import Protocol, ProxyRequest, Reason
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.resolver import resolve
from codex_proxy.resolver import (
    ResolveEntryError,
    TableResolver,
    parse_resolve_entry,
    resolver_with,
)
from codex_proxy.tap import Options
from codex_proxy.testing import StaticResolver


def ips(*texts: str):
    return tuple(ipaddress.ip_address(t) for t in texts)


@pytest.mark.parametrize(
    "entry, name, addresses",
    [
        ("a.test=127.0.0.1", "a.test", ips("127.0.0.1")),
        ("A.Test.=10.0.0.1, [::1] ,10.0.0.1", "a.test", ips("10.0.0.1", "::1")),
        ("api.example=2001:4860::8888", "api.example", ips("2001:4860::8888")),
    ],
)
def test_entries_parse_to_a_normalised_name_and_addresses_in_order(entry, name, addresses):
    assert parse_resolve_entry(entry) == (name, addresses)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("a.test", "expected NAME=ADDR"),
        ("=127.0.0.1", "expected NAME=ADDR"),
        ("a.test=", "expected NAME=ADDR"),
        ("127.0.0.1=10.0.0.1", "is an IP address, not a name"),
        ("2130706433=10.0.0.1", "is an IP address, not a name"),
        ("a.test=127.1", "'127.1' in 'a.test=127.1' is not an IP address"),
        ("a.test=10.0.0.1,nope", "'nope'"),
        ("bad name=10.0.0.1", "invalid name"),
    ],
)
def test_malformed_entries_are_refused_naming_the_entry(entry, message):
    with pytest.raises(ResolveEntryError) as e:
        parse_resolve_entry(entry)
    assert message in str(e.value)


class Receiver:
    def __init__(self) -> None:
        self.found: List[str] = []
        self.complete = False

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        self.found.append(address.host)

    def resolutionComplete(self) -> None:
        self.complete = True


def test_table_names_are_answered_others_go_to_the_fallback():
    fallback = StaticResolver({"other.test": ["203.0.114.9"]})
    resolver = TableResolver({"a.test": ips("127.0.0.1", "::1")}, fallback)
    pinned, other = Receiver(), Receiver()
    resolver.resolveHostName(pinned, "a.test", 443)
    resolver.resolveHostName(other, "other.test", 443)
    assert (pinned.found, pinned.complete) == (["127.0.0.1", "::1"], True)
    assert other.found == ["203.0.114.9"]
    assert fallback.lookups == ["other.test"]


def test_without_fallback_unknown_names_do_not_resolve():
    clock = MemoryReactorClock()
    failures: List[object] = []
    resolve(TableResolver({}), clock, "x.test", 80, 5).addErrback(failures.append)
    assert failures[0].value.reason is Reason.UPSTREAM_DNS_FAILED


def test_resolver_with_no_entries_is_the_fallback_itself():
    fallback = StaticResolver({})
    assert resolver_with([], fallback) is fallback


def test_a_later_entry_for_a_name_replaces_an_earlier_one():
    resolver = resolver_with(["a.test=10.0.0.1", "A.test=10.0.0.2"], StaticResolver({}))
    receiver = Receiver()
    resolver.resolveHostName(receiver, "a.test")
    assert receiver.found == ["10.0.0.2"]


def _check(service: PolicyService, host: str):
    results: List[object] = []
    service.check(ProxyRequest(Protocol.HTTPS_CONNECT, host, 443, method="CONNECT")).addBoth(
        results.append
    )
    return results[0]


@pytest.mark.parametrize("local_binding, allowed", [(False, False), (True, True)])
def test_pinned_answers_are_vetted_like_dns(local_binding, allowed):
    resolver = resolver_with(["db.test=127.0.0.1"], StaticResolver({}))
    service = PolicyService(
        Policy.build(allowed=["**.test"], allow_local_binding=local_binding),
        resolver=resolver,
        clock=MemoryReactorClock(),
    )
    verdict = _check(service, "db.test")
    assert verdict.allowed is allowed
    if not allowed:
        assert verdict.reason is Reason.NOT_ALLOWED_LOCAL


def test_the_builder_hands_its_resolver_to_the_policy_service():
    resolver = StaticResolver({"a.test": ["203.0.114.9"]})
    config = parse_config(b'[network]\nenabled = true\nallowed_domains = ["a.test"]\n', "c.toml")
    built: List[NetworkProxy] = []
    NetworkProxy.builder().config(config).reactor(MemoryReactorClock()).resolver(
        resolver
    ).build().addCallback(built.append)
    verdict = _check(built[0].policy, "a.test")
    assert [str(ip) for ip in verdict.addresses] == ["203.0.114.9"]
    assert resolver.lookups == ["a.test"]


def test_twistd_option_is_repeatable_and_validated(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[network]\nenabled = true\nproxy_url = "127.0.0.1:0"\n')
    options = Options()
    options.parseOptions(
        ["--config", str(path), "--resolve", "a.test=127.0.0.1", "--resolve=b.test=::1"]
    )
    assert options.resolve == ("a.test=127.0.0.1", "b.test=::1")
    with pytest.raises(usage.UsageError, match="--resolve: 'x' in 'a.test=x' is not an IP"):
        Options().parseOptions(["--config", str(path), "--resolve", "a.test=x"])
