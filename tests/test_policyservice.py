"""
PolicyService: resolution, vetting, audit events and blocked history.
"""

from __future__ import annotations

import ipaddress
from typing import List

import attrs
import pytest
from twisted.internet.testing import MemoryReactorClock

from codex_proxy.audit import rfc3339
from codex_proxy.errors import UpstreamError
from codex_proxy.model import Decision, Mode, Protocol, ProxyRequest, Reason, Source, Verdict
from codex_proxy.policy import Policy
from codex_proxy import policyservice
from codex_proxy.policyservice import BLOCKED_HISTORY, PolicyService
from codex_proxy.testing import RecordingAuditor, RecordingDecider, StaticResolver


def service(resolver: StaticResolver, **policy) -> tuple[PolicyService, RecordingAuditor]:
    clock = MemoryReactorClock()
    clock.advance(1_700_000_000.25)
    auditor = RecordingAuditor(clock.seconds)
    policy.setdefault("allowed", ["**.example.com", "localhost"])
    svc = PolicyService(Policy.build(**policy), resolver=resolver, clock=clock, auditor=auditor)
    return svc, auditor


def check(svc: PolicyService, host: str, port: int = 443, **kw):
    results: List[object] = []
    svc.check(ProxyRequest(Protocol.HTTPS_CONNECT, host, port, method="CONNECT", **kw)).addBoth(
        results.append
    )
    assert len(results) == 1
    return results[0]


def test_allowed_name_carries_every_vetted_address_resolved_once():
    resolver = StaticResolver({"a.example.com": ["203.0.114.1", "2001:4860::8"]})
    svc, _ = service(resolver)
    verdict = check(svc, "A.Example.COM.")
    assert verdict.allowed
    assert [str(ip) for ip in verdict.addresses] == ["203.0.114.1", "2001:4860::8"]
    assert resolver.lookups == ["a.example.com"]


@pytest.mark.parametrize(
    "answers",
    [
        ["203.0.114.1", "127.0.0.1"],
        ["10.0.0.1"],
        ["::ffff:127.0.0.1"],
        ["64:ff9b::a9fe:a9fe"],  # NAT64 of 169.254.169.254
        ["2002:c0a8:0101::1"],  # 6to4 of 192.168.1.1
    ],
)
def test_any_non_public_answer_refuses_the_whole_name(answers):
    svc, auditor = service(StaticResolver({"a.example.com": answers}))
    verdict = check(svc, "a.example.com")
    assert not verdict.allowed
    assert verdict.reason is Reason.NOT_ALLOWED_LOCAL
    assert verdict.addresses == ()
    assert auditor.events[-1]["network.policy.reason"] == "not_allowed_local"


def test_exactly_allowlisted_localhost_may_resolve_to_loopback():
    svc, _ = service(StaticResolver({"localhost": ["127.0.0.1", "::1"]}))
    verdict = check(svc, "localhost")
    assert verdict.allowed
    assert [str(ip) for ip in verdict.addresses] == ["127.0.0.1", "::1"]


def test_allow_local_binding_accepts_private_answers():
    svc, _ = service(StaticResolver({"a.example.com": ["10.0.0.1"]}), allow_local_binding=True)
    assert check(svc, "a.example.com").allowed


def test_unresolvable_name_fails_with_dns_error_and_one_event():
    svc, auditor = service(StaticResolver({}))
    failure = check(svc, "missing.example.com")
    assert failure.check(UpstreamError)
    assert failure.value.reason is Reason.UPSTREAM_DNS_FAILED
    assert [e["network.policy.reason"] for e in auditor.events] == ["upstream_dns_failed"]
    assert svc.blocked() == []  # a DNS failure is not a policy block


def test_audit_event_fields():
    svc, auditor = service(StaticResolver({}))
    check(svc, "nope.test", 8443, client="127.0.0.1:5000")
    (event,) = auditor.events
    assert event == {
        "event.name": "codex.network_proxy.policy_decision",
        "event.timestamp": "2023-11-14T22:13:20.250Z",
        "network.policy.scope": "domain",
        "network.policy.decision": "deny",
        "network.policy.source": "baseline_policy",
        "network.policy.reason": "not_allowed",
        "network.transport.protocol": "https_connect",
        "server.address": "nope.test",
        "server.port": 8443,
        "http.request.method": "CONNECT",
        "client.address": "127.0.0.1:5000",
        "network.policy.override": False,
    }


def test_absent_method_and_client_are_spelled_out():
    svc, auditor = service(StaticResolver({}))
    svc.check(ProxyRequest(Protocol.SOCKS5_TCP, "nope.test", 22))
    assert auditor.events[-1]["http.request.method"] == "none"
    assert auditor.events[-1]["client.address"] == "unknown"


def test_blocked_history_keeps_the_most_recent():
    svc, _ = service(StaticResolver({}))
    for i in range(BLOCKED_HISTORY + 5):
        check(svc, f"h{i}.test")
    blocked = svc.blocked()
    assert len(blocked) == BLOCKED_HISTORY
    assert blocked[0].host == "h5.test"
    assert blocked[-1].host == f"h{BLOCKED_HISTORY + 4}.test"


def test_reload_swaps_the_policy_for_new_decisions():
    svc, _ = service(StaticResolver({"a.test": ["203.0.114.1"]}))
    assert not check(svc, "a.test").allowed
    svc.reload(Policy.build(allowed=["a.test"]))
    assert check(svc, "a.test").allowed


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "1970-01-01T00:00:00.000Z"), (1.9996, "1970-01-01T00:00:02.000Z")],
)
def test_rfc3339_rounding(seconds, text):
    assert rfc3339(seconds) == text


def test_rfc3339_each_millisecond_its_own():
    """
    Timestamps are formatted once per millisecond: the ones of neighbouring
    milliseconds and seconds, asked for in turn, still read as their own.
    """
    stamps = [1.0004, 1.0006, 2.0004, 1.0004, 61.9994]
    assert [rfc3339(s) for s in stamps] == [
        "1970-01-01T00:00:01.000Z",
        "1970-01-01T00:00:01.001Z",
        "1970-01-01T00:00:02.000Z",
        "1970-01-01T00:00:01.000Z",
        "1970-01-01T00:01:01.999Z",
    ]


@pytest.mark.parametrize(
    "policy, full, reason",
    [
        ({}, False, None),
        ({}, True, "too_many_udp_associations"),
        ({"mode": Mode.LIMITED}, False, "method_not_allowed"),
        ({"mode": Mode.LIMITED}, True, "method_not_allowed"),
        ({"enabled": False}, True, "proxy_disabled"),
    ],
)
def test_udp_associations_are_decided_and_refusals_audited_once(policy, full, reason):
    svc, auditor = service(StaticResolver({}), **policy)
    request = ProxyRequest(Protocol.SOCKS5_UDP, "0.0.0.0", 7000, client="127.0.0.1:5000")
    verdict = svc.check_association(request, full=full)
    if reason is None:
        assert verdict.allowed
        assert auditor.events == []
    else:
        assert verdict.reason.value == reason
        assert [e["network.policy.reason"] for e in auditor.events] == [reason]
        assert svc.blocked() == [verdict]


# -- the proxy's own listening addresses (SPEC §4.2b) ---------------------------


def _own_service(resolver=None, **policy):
    policy.setdefault("allowed", ["127.0.0.1", "::1", "**.example.com", "10.0.0.5"])
    svc, auditor = service(resolver or StaticResolver({}), **policy)
    return svc, auditor


@pytest.mark.parametrize(
    "own, host, port, refused",
    [
        ([("127.0.0.1", 3128)], "127.0.0.1", 3128, True),
        ([("127.0.0.1", 3128)], "127.0.0.1", 3129, False),
        ([("127.0.0.1", 3128)], "::ffff:127.0.0.1", 3128, True),
        ([("127.0.0.1", 3128)], "0.0.0.0", 3128, True),
        ([("::1", 8081)], "::1", 8081, True),
        ([("::1", 8081)], "127.0.0.1", 8081, False),
        ([("0.0.0.0", 3128)], "10.0.0.5", 3128, True),
        ([("0.0.0.0", 3128)], "127.0.0.1", 3128, True),
        ([("::", 3128)], "127.0.0.1", 3128, True),
        ([("0.0.0.0", 3128)], "203.0.114.1", 3128, False),
        ([("0.0.0.0", 3128)], "10.0.0.5", 80, False),
    ],
)
def test_own_listening_address_literal_is_not_allowed_local(own, host, port, refused):
    svc, auditor = _own_service(allow_local_binding=True, allowed=[host])
    svc.set_own_addresses(own)
    verdict = check(svc, host, port)
    assert verdict.allowed is not refused
    if refused:
        assert verdict.reason is Reason.NOT_ALLOWED_LOCAL
        assert verdict.addresses == ()
    assert len(auditor.events) == 1


def test_own_listening_address_among_the_answers_refuses_the_name():
    resolver = StaticResolver({"a.example.com": ["203.0.114.1", "127.0.0.1"]})
    svc, auditor = _own_service(resolver, allow_local_binding=True)
    svc.set_own_addresses(iter([("127.0.0.1", 3128), ("127.0.0.1", 8081)]))
    assert svc.own_addresses == {("127.0.0.1", 3128), ("127.0.0.1", 8081)}
    verdict = check(svc, "a.example.com", 8081)
    assert verdict.reason is Reason.NOT_ALLOWED_LOCAL
    assert [e["network.policy.reason"] for e in auditor.events] == ["not_allowed_local"]
    assert check(svc, "a.example.com", 443).allowed


def test_own_listening_address_pinned_by_a_tunnel_is_refused_to_inner_requests():
    svc, auditor = _own_service(allow_local_binding=True)
    tunnel = check(svc, "127.0.0.1", 3128)
    assert tunnel.allowed
    svc.set_own_addresses([("127.0.0.1", 3128)])
    inner = ProxyRequest(Protocol.HTTPS, "127.0.0.1", 3128, method="GET")
    results: List[object] = []
    svc.check_pinned(inner, tunnel).addBoth(results.append)
    [verdict] = results
    assert verdict.reason is Reason.NOT_ALLOWED_LOCAL
    assert verdict.addresses == ()
    assert [e["network.policy.reason"] for e in auditor.events] == [
        "allowed",
        "not_allowed_local",
    ]


def _get(client: str, host: str = "127.0.0.1") -> ProxyRequest:
    return ProxyRequest(Protocol.HTTP, host, 8080, method="GET", client=client)


def test_repeated_requests_are_decided_once_per_policy_and_each_audited(monkeypatch):
    decided: List[ProxyRequest] = []
    real = policyservice.decide
    monkeypatch.setattr(policyservice, "decide", lambda p, r: decided.append(r) or real(p, r))
    svc, auditor = service(StaticResolver({}), allowed=["127.0.0.1"])
    clients = ["127.0.0.1:5000", "127.0.0.1:5001", "127.0.0.1:5001"]
    verdicts = [svc.decide_now(_get(client)) for client in clients]
    assert len(decided) == 1
    assert [v.request.client for v in verdicts] == clients
    assert [e["client.address"] for e in auditor.events] == clients
    assert all(e["network.policy.decision"] == "allow" for e in auditor.events)
    assert auditor.events[0] == {**auditor.events[2], "client.address": clients[0]}


def test_a_reload_decides_the_next_request_under_the_new_policy():
    svc, auditor = service(StaticResolver({}), allowed=["127.0.0.1"])
    assert svc.decide_now(_get("127.0.0.1:5000")).allowed
    svc.reload(Policy.build(allowed=["127.0.0.1"], denied=["127.0.0.1"]))
    assert svc.decide_now(_get("127.0.0.1:5000")).reason is Reason.DENIED
    assert [e["network.policy.reason"] for e in auditor.events] == ["allowed", "denied"]


def test_decide_now_answers_at_once_only_what_needs_no_resolution_or_decider():
    svc, auditor = service(StaticResolver({"a.example.com": ["203.0.114.1"]}))
    assert svc.decide_now(_get("127.0.0.1:5000", "a.example.com")) is None
    assert auditor.events == []
    assert svc.decide_now(_get("127.0.0.1:5000", "nope.test")).reason is Reason.NOT_ALLOWED
    assert len(auditor.events) == 1
    svc.decider = RecordingDecider(lambda request: None)
    assert svc.decide_now(_get("127.0.0.1:5000", "nope.test")) is None
    assert len(auditor.events) == 1


def test_a_request_naming_a_secret_is_not_answered_by_the_verdict_of_one_that_does_not():
    svc, auditor = service(StaticResolver({}), allowed=["127.0.0.1"], secrets=[("TOKEN", ["api.example.com"])])
    plain = ProxyRequest(Protocol.HTTPS, "127.0.0.1", 8443, method="GET", client="127.0.0.1:5000")
    assert svc.decide_now(plain).allowed
    with_secret = attrs.evolve(plain, secrets=("TOKEN",))
    assert not svc.decide_now(with_secret).allowed
    assert svc.decide_now(attrs.evolve(plain, client=None)).request.client is None


def test_new_own_addresses_apply_to_a_literal_decided_before():
    svc, auditor = service(StaticResolver({}), allowed=["127.0.0.1"])
    request = _get("127.0.0.1:5000")
    assert svc.decide_now(request).allowed
    svc.set_own_addresses([("127.0.0.1", 8080)])
    assert svc.decide_now(request).reason is Reason.NOT_ALLOWED_LOCAL
    assert [e["network.policy.decision"] for e in auditor.events] == ["allow", "deny"]


def test_each_client_is_decided_by_its_own_policy_through_the_cache():
    base = Policy.build(allowed=["127.0.0.1"])
    strict = Policy.build(allowed=["127.0.0.1"], denied=["127.0.0.1"])
    svc, auditor = service(StaticResolver({}))
    svc.reload(attrs.evolve(base, clients={"ci": strict}))
    anonymous = _get("127.0.0.1:5000")
    assert svc.decide_now(anonymous).allowed
    assert svc.decide_now(attrs.evolve(anonymous, client_identity="ci")).reason is Reason.DENIED
    assert svc.decide_now(anonymous).allowed


def test_a_literal_is_vetted_once_per_kind_and_each_connection_sees_its_own_client(monkeypatch):
    vetted: List[str] = []
    real = policyservice.vet
    monkeypatch.setattr(policyservice, "vet", lambda p, v, found: vetted.append(v.request.client) or real(p, v, found))
    svc, auditor = service(StaticResolver({}), allowed=["127.0.0.1"])
    clients = ["127.0.0.1:5000", "127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5001"]
    verdicts = [svc.decide_now(_get(client)) for client in clients]
    assert vetted == ["127.0.0.1:5000"]
    assert [(v.request.client, [str(ip) for ip in v.addresses]) for v in verdicts] == [
        (client, ["127.0.0.1"]) for client in clients
    ]
    assert [e["client.address"] for e in auditor.events] == clients


def test_a_verdict_about_another_request_differs_in_its_request_only():
    request = _get("127.0.0.1:5000")
    verdict = Verdict(
        request, "h.test", Decision.DENY, Source.DECIDER, Reason.DENIED, (ipaddress.ip_address("192.0.2.1"),),
        intercept=True, override=True, matched="*.test", detail="why", secret="TOKEN",
    )
    other = _get("127.0.0.1:5001")
    assert verdict.about(other) == attrs.evolve(verdict, request=other)


def test_the_kind_of_a_request_is_all_of_it_but_the_clients_address():
    """
    The verdict cache answers a request by its kind: a field left out of
    the kind would let one request be answered by another's verdict.
    """
    request = ProxyRequest(Protocol.HTTP, "a.test", 80, method="GET", client="127.0.0.1:5000")
    other = {
        "protocol": Protocol.HTTPS,
        "host": "b.test",
        "port": 81,
        "method": "POST",
        "has_body": True,
        "upgrade": True,
        "override_methods": ("DELETE",),
        "client": "127.0.0.1:5001",
        "command": "user",
        "unix_socket": "/tmp/s",
        "secrets": ("TOKEN",),
        "client_identity": "ci",
    }
    assert sorted(other) == sorted(field.name for field in attrs.fields(ProxyRequest))
    for name, value in other.items():
        changed = attrs.evolve(request, **{name: value})
        assert (changed.kind() == request.kind()) == (name == "client"), name


def test_what_follows_from_a_verdict_is_worked_out_once_per_verdict_object():
    """
    L{PerVerdict} (audit fields, routes) derives once for the verdict the
    cache hands out again, again for another verdict object even if equal,
    and starts over once full.
    """
    from codex_proxy.model import PerVerdict

    derived: List[Verdict] = []

    def derive(verdict: Verdict) -> str:
        derived.append(verdict)
        return verdict.host

    memo = PerVerdict(derive, size=2)
    request = ProxyRequest(Protocol.HTTP, "a.test", 80, method="GET")
    one = Verdict(request, "a.test", Decision.ALLOW, Source.BASELINE_POLICY)
    equal = attrs.evolve(one)
    other = attrs.evolve(one, host="b.test")
    assert [memo(one), memo(one), memo(equal), memo(other), memo(one)] == ["a.test", "a.test", "a.test", "b.test", "a.test"]
    assert [d is one for d in derived] == [True, False, False, True]


def test_copies_of_a_verdict_for_other_connections_share_what_follows_from_it():
    """
    A verdict copied for another connection's request of the kind (and a
    copy of that copy) keeps the verdict it came from: L{PerVerdict} derives
    once for all of them, from that verdict.
    """
    from codex_proxy.model import PerVerdict

    derived: List[Verdict] = []
    memo = PerVerdict(lambda verdict: derived.append(verdict) or verdict.host)
    one = Verdict(_get("127.0.0.1:5000"), "127.0.0.1", Decision.ALLOW, Source.BASELINE_POLICY)
    copy = one.about(_get("127.0.0.1:5001"))
    again = copy.about(_get("127.0.0.1:5002"))
    assert (one.original, copy.original, again.original) == (None, one, one)
    assert again.original is one
    assert [memo(copy), memo(again), memo(one)] == ["127.0.0.1"] * 3
    assert derived == [one] and derived[0] is one
    # A verdict made from a copy any other way may say something else: it
    # is its own.
    denied = attrs.evolve(copy, decision=Decision.DENY, reason=Reason.NOT_ALLOWED_LOCAL)
    assert denied.original is None
    assert memo(denied) == "127.0.0.1" and derived[-1] is denied
