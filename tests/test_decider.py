"""
The policy decider (SPEC §9.2) seen from an HTTP client: every outcome's
status, x-proxy-error, JSON body, audit event and blocked-history entry, and
the cases where the decider must never be asked.
"""

from __future__ import annotations

import json
from typing import Any, Callable, List, Optional

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent

from codex_proxy.decider import Allow, Ask, Deny, NetworkPolicyRequest, consult
from codex_proxy.httpproxy import HTTPProxyFactory
from codex_proxy.model import Mode, Protocol
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.testing import RecordingAuditor, RecordingDecider, StaticResolver
from codex_proxy.upstream import Upstream

PUBLIC = "203.0.114.10"
TIMEOUT = 30.0


class Proxy:
    """
    One HTTP listener connection whose policy service has C{decider}.
    """

    def __init__(self, decider: Optional[Callable[..., Any]], trickle: bool, **policy: Any):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_700_000_000)
        self.decider = RecordingDecider(decider) if decider is not None else None
        self.resolver = StaticResolver(
            {"miss.test": [PUBLIC], "allowed.test": [PUBLIC], "rebind.test": ["10.0.0.1"]}
        )
        self.auditor = RecordingAuditor(self.reactor.seconds)
        policy.setdefault("allowed", ["allowed.test"])
        policy.setdefault("denied", ["denied.test"])

        self.service = PolicyService(
            Policy.build(**policy),
            resolver=self.resolver,
            clock=self.reactor,
            auditor=self.auditor,
            decider=self.decider,
            decider_timeout=TIMEOUT,
        )
        factory = HTTPProxyFactory(self.service, Upstream(self.reactor, 10), self.reactor)
        self.proto = factory.buildProtocol(None)
        self.client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        self.proto.makeConnection(self.client)
        self.trickle = trickle

    @property
    def asked(self) -> List[NetworkPolicyRequest]:
        return self.decider.asked if self.decider is not None else []

    def send(self, data: bytes) -> None:
        pieces = [data[i : i + 1] for i in range(len(data))] if self.trickle else [data]
        for piece in pieces:
            self.proto.dataReceived(piece)

    def get(self, host: str, method: str = "GET") -> None:
        self.send(f"{method} http://{host}/secret?q=1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())

    def response(self) -> tuple[int, dict, Any]:
        head, _, body = self.client.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        return int(lines[0].split()[1]), headers, json.loads(body) if body else None

    def dials(self) -> List[tuple]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]


def _blocked_by_decider(proxy: Proxy, decision: str) -> None:
    status, headers, body = proxy.response()
    assert status == 403
    assert headers["x-proxy-error"] == "blocked-by-policy"
    assert body["reason"] == "policy_denied"
    assert body["decision"] == decision
    assert body["source"] == "decider"
    assert body["host"] == "miss.test"
    (event,) = proxy.auditor.events
    assert event["network.policy.decision"] == decision
    assert event["network.policy.source"] == "decider"
    assert event["network.policy.reason"] == "policy_denied"
    assert event["network.policy.override"] is False
    assert proxy.dials() == []
    assert proxy.resolver.lookups == []


def test_allow_overrides_a_miss_then_resolves_and_dials(trickle):
    proxy = Proxy(lambda request: Allow(), trickle)
    proxy.get("miss.test")
    assert proxy.asked == [
        NetworkPolicyRequest(
            protocol=Protocol.HTTP,
            host="miss.test",
            port=80,
            client_addr="127.0.0.1:5555",
            method="GET",
        )
    ]
    assert proxy.dials() == [(PUBLIC, 80)]
    (event,) = proxy.auditor.events
    assert event["network.policy.decision"] == "allow"
    assert event["network.policy.source"] == "decider"
    assert event["network.policy.override"] is True
    assert proxy.service.blocked() == []


@pytest.mark.parametrize(
    "answer, decision, detail",
    [
        (Deny("not today"), "deny", "not today"),
        (Ask("ask the user"), "ask", "ask the user"),
    ],
)
def test_deny_and_ask_block_with_policy_denied(trickle, answer, decision, detail):
    proxy = Proxy(lambda request: answer, trickle)
    proxy.get("miss.test")
    _blocked_by_decider(proxy, decision)
    (entry,) = proxy.service.blocked()
    assert (entry.host, entry.decision.value, entry.detail) == ("miss.test", decision, detail)


def test_a_raising_decider_denies(trickle):
    def broken(request: NetworkPolicyRequest) -> Any:
        raise KeyError("boom")

    proxy = Proxy(broken, trickle)
    proxy.get("miss.test")
    _blocked_by_decider(proxy, "deny")
    assert "KeyError" in proxy.service.blocked()[0].detail


def test_a_failing_deferred_or_a_wrong_answer_denies():
    for decider in (lambda r: defer.fail(ValueError("no")), lambda r: "yes"):
        proxy = Proxy(decider, trickle=False)
        proxy.get("miss.test")
        _blocked_by_decider(proxy, "deny")


def test_a_decider_that_never_answers_denies_at_the_timeout(trickle):
    pending: List[defer.Deferred] = []

    def silent(request: NetworkPolicyRequest) -> defer.Deferred:
        pending.append(defer.Deferred())
        return pending[-1]

    proxy = Proxy(silent, trickle)
    proxy.get("miss.test")
    proxy.reactor.advance(TIMEOUT - 0.001)
    assert proxy.client.value() == b"" and proxy.auditor.events == []
    proxy.reactor.advance(0.001)
    _blocked_by_decider(proxy, "deny")
    assert "did not answer within 30.0s" in proxy.service.blocked()[0].detail
    pending[0].callback(Allow())  # a late answer changes nothing
    assert len(proxy.auditor.events) == 1


def test_a_later_deferred_answer_is_used():
    pending: List[defer.Deferred] = []
    proxy = Proxy(lambda r: pending.append(defer.Deferred()) or pending[-1], trickle=False)
    proxy.get("miss.test")
    assert proxy.dials() == []
    pending[0].callback(Allow())
    assert proxy.dials() == [(PUBLIC, 80)]


def test_a_coroutine_decider_is_awaited():
    pending: defer.Deferred = defer.Deferred()

    async def decider(request: NetworkPolicyRequest) -> Any:
        return await pending

    proxy = Proxy(decider, trickle=False)
    proxy.get("miss.test")
    pending.callback(Ask("later"))
    _blocked_by_decider(proxy, "ask")


class _Ready:
    """
    An awaitable that is no coroutine (as a future is), already done.
    """

    def __init__(self, decision: Any) -> None:
        self._decision = decision

    def __await__(self) -> Any:
        yield from ()
        return self._decision


def test_any_awaitable_decider_answer_is_awaited():
    proxy = Proxy(lambda request: _Ready(Allow()), trickle=False)
    proxy.get("miss.test")
    assert proxy.dials() == [(PUBLIC, 80)]


def test_a_client_leaving_cancels_the_pending_decider():
    cancelled: List[bool] = []
    proxy = Proxy(lambda r: defer.Deferred(lambda d: cancelled.append(True)), trickle=False)
    proxy.get("miss.test")
    proxy.proto.connectionLost()
    assert cancelled == [True]
    assert proxy.auditor.events == []


def test_an_allowed_name_resolving_locally_is_still_refused():
    proxy = Proxy(lambda r: Allow(), trickle=False)
    proxy.get("rebind.test")
    status, headers, body = proxy.response()
    assert (status, headers["x-proxy-error"], body["reason"]) == (
        403,
        "blocked-by-allowlist",
        "not_allowed_local",
    )
    assert proxy.auditor.events[0]["network.policy.override"] is False


def test_limited_mode_still_guards_what_the_decider_allowed():
    proxy = Proxy(lambda r: Allow(), trickle=False, mode=Mode.LIMITED)
    proxy.get("miss.test", method="POST")
    status, headers, body = proxy.response()
    assert (status, headers["x-proxy-error"], body["source"]) == (
        403,
        "blocked-by-method-policy",
        "mode_guard",
    )
    assert len(proxy.asked) == 1
    assert proxy.resolver.lookups == []


@pytest.mark.parametrize(
    "host, method, policy, header",
    [
        ("denied.test", "GET", {}, "blocked-by-denylist"),
        ("127.0.0.1", "GET", {}, "blocked-by-allowlist"),
        ("localhost", "GET", {}, "blocked-by-allowlist"),
        ("allowed.test", "POST", {"mode": Mode.LIMITED}, "blocked-by-method-policy"),
        ("miss.test", "GET", {"managed_allowed_domains_only": True}, "blocked-by-allowlist"),
        ("miss.test", "GET", {"enabled": False}, "proxy-disabled"),
        ("bad_host!", "GET", {}, "invalid-host"),
    ],
    ids=["denied", "local-ip", "localhost", "limited-mode", "managed-only", "disabled", "invalid"],
)
def test_the_decider_is_never_asked_outside_allowlist_misses(host, method, policy, header):
    proxy = Proxy(lambda r: Allow(), trickle=False, **policy)
    proxy.get(host, method)
    status, headers, _ = proxy.response()
    assert proxy.asked == []
    assert status in (400, 403, 503)
    assert headers.get("x-proxy-error") == header


def test_the_warning_about_a_broken_decider_is_one_escaped_log_line():
    def broken(request: NetworkPolicyRequest) -> Any:
        raise ValueError(f"cannot judge {request.host}\r\nFAKE: planted\x1b[2J")

    asked = NetworkPolicyRequest(Protocol.SOCKS5_TCP, "miss.test", 22)
    with capturedLogs() as events:
        consult(broken, asked, MemoryReactorClock(), TIMEOUT)
    [line] = [formatEvent(event) for event in events]
    assert "FAKE: planted" in line and "miss.test:22" in line
    assert not any(char in line for char in "\r\n\x1b")
