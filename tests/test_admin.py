"""
Tests for L{codex_proxy.admin}: the operations listener as a client of it
sees it, through a real L{twisted.web.server.Site} on an in-memory
transport.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Tuple, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, globalLogPublisher

from codex_proxy.admin import REDACTED, admin_site, redact
from codex_proxy.audit import Auditor, JSONLinesLog
from codex_proxy.metrics import Metrics
from codex_proxy.model import Decision, Protocol, ProxyRequest, Reason, Source, Verdict

TOKEN = "admin-token-0123456789abcdef"

BLOCKED = [
    {"event.timestamp": "2026-01-01T00:00:01.000Z", "server.address": "first.example"},
    {"event.timestamp": "2026-01-01T00:00:02.000Z", "server.address": "second.example"},
]


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        self.headers: Dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.decode().lower()] = value.strip().decode()
        self.raw = raw


def request(
    site: Any,
    path: str,
    method: str = "GET",
    headers: Mapping[str, str] = {},
) -> Response:
    """
    One request over a fresh in-memory connection; the whole response.
    """
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 9090),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    channel.makeConnection(transport)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1:9090", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
    return Response(transport.value())


def make_site(
    metrics: Optional[Metrics] = None,
    ready: bool = True,
    policy: Optional[Mapping[str, Any]] = None,
    token: Optional[str] = None,
) -> Any:
    return admin_site(
        metrics or Metrics(start_time=0.0),
        ready=lambda: ready,
        blocked=lambda: BLOCKED,
        policy=lambda: policy or {"mode": "full", "allowed_domains": ["a.example"]},
        token=token,
        reactor=MemoryReactorClock(),
    )


def parsed(body: bytes) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_counts_the_events_fed() -> None:
    """
    C{GET /metrics} is the Prometheus text format, parsed by
    prometheus_client's own parser, and its counters equal the events fed.
    """
    metrics = Metrics(start_time=1234.0)
    for decision, reason, n in (("deny", "not_allowed", 3), ("allow", "allowed", 5)):
        for _ in range(n):
            metrics.decision(
                {
                    "network.policy.decision": decision,
                    "network.policy.reason": reason,
                    "network.transport.protocol": "https_connect",
                }
            )
    metrics.connection_opened("socks5")
    metrics.tunnel_opened("socks5")
    response = request(make_site(metrics), "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = parsed(response.body)
    labels = (("client", "anonymous"), ("protocol", "https_connect"))
    deny = (("decision", "deny"), ("reason", "not_allowed"))
    allow = (("decision", "allow"), ("reason", "allowed"))
    assert samples[("codexproxy_decisions_total", tuple(sorted(deny + labels)))] == 3
    assert samples[("codexproxy_decisions_total", tuple(sorted(allow + labels)))] == 5
    assert samples[("codexproxy_connections_open", (("listener", "socks5"),))] == 1
    assert samples[("codexproxy_tunnels_open", (("listener", "socks5"),))] == 1
    assert samples[("codexproxy_start_time_seconds", ())] == 1234.0


def test_head_metrics() -> None:
    """
    C{HEAD /metrics} has the headers of C{GET}, its length, and no body.
    """
    site = make_site()
    got = request(site, "/metrics")
    head = request(site, "/metrics", "HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert int(head.headers["content-length"]) > 0


@pytest.mark.parametrize(
    "ready, status, body", [(True, 200, b"ok\n"), (False, 503, b"not ready\n")]
)
def test_healthz(ready: bool, status: int, body: bytes) -> None:
    """
    C{/healthz} is 200 C{ok} when ready, else 503.
    """
    response = request(make_site(ready=ready), "/healthz")
    assert (response.status, response.body) == (status, body)


def test_blocked_newest_first() -> None:
    """
    C{/blocked} is JSON, the most recent blocked decision first.
    """
    response = request(make_site(), "/blocked")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert [e["server.address"] for e in json.loads(response.body)] == [
        "second.example",
        "first.example",
    ]


def test_policy_json() -> None:
    """
    C{/policy} is the caller's policy document as JSON.
    """
    response = request(make_site(), "/policy")
    assert json.loads(response.body) == {"mode": "full", "allowed_domains": ["a.example"]}


def test_policy_never_shows_tokens_or_secrets() -> None:
    """
    Even if the policy document carried a token or secret value, C{/policy}
    renders none: every plain value under such a key is redacted.
    """
    policy = {
        "admin_token": "tok-0123456789abcdef-value",
        "clients": {"ci": {"token_file": "/run/t", "Token": "tok-client-value-0123"}},
        "secrets": {"OPENAI_API_KEY": {"hosts": ["api.openai.com"], "value": "x"}},
        "nested": [{"client_secret": "sec-value-0123"}],
        "password": 12345,
    }
    body = request(make_site(policy=policy), "/policy").body
    for leaked in (b"tok-0123", b"tok-client", b"/run/t", b"sec-value", b"12345"):
        assert leaked not in body
    document = json.loads(body)
    assert document["clients"]["ci"]["Token"] == REDACTED
    assert document["secrets"]["OPENAI_API_KEY"]["hosts"] == ["api.openai.com"]


def test_redact_keeps_the_rest() -> None:
    """
    Redaction touches only values under sensitive key names.
    """
    assert redact({"mode": "full", "limits": {"a": 1}, "l": [1, "x"]}) == {
        "mode": "full",
        "limits": {"a": 1},
        "l": [1, "x"],
    }


@pytest.mark.parametrize("path", ["/", "/nope", "/metrics/", "/metrics/x", "/healthz/../x"])
def test_not_found(path: str) -> None:
    """
    Anything but the four pages is 404.
    """
    assert request(make_site(), path).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "BREW"])
def test_method_not_allowed(method: str) -> None:
    """
    Any method but GET and HEAD on a page is 405 with C{Allow}.
    """
    response = request(make_site(), "/metrics", method)
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"],
)
def test_token_required(authorization: Optional[str]) -> None:
    """
    With a token, a request without it (or with another) is 401 with
    C{WWW-Authenticate: Bearer}, on every path and method.
    """
    site = make_site(token=TOKEN)
    headers = {} if authorization is None else {"Authorization": authorization}
    for path, method in (("/metrics", "GET"), ("/nope", "GET"), ("/policy", "POST")):
        response = request(site, path, method, headers)
        assert response.status == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert TOKEN.encode() not in response.raw


def test_token_accepted() -> None:
    """
    With the right bearer token (scheme in any case) the pages answer,
    and the token appears in no response and no log event.
    """
    events: List[Dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        site = make_site(token=TOKEN)
        for scheme in ("Bearer", "bearer"):
            for path in ("/metrics", "/healthz", "/blocked", "/policy", "/nope"):
                response = request(site, path, headers={"Authorization": f"{scheme} {TOKEN}"})
                assert response.status == (404 if path == "/nope" else 200)
                assert TOKEN.encode() not in response.raw
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not any(TOKEN in repr(event) for event in events)


def test_metrics_agree_with_the_audit_log(tmp_path: Any) -> None:
    """
    With the metrics and the audit log both sinks of one auditor, the
    scraped decision counters equal the log's line counts by decision and
    reason.
    """
    metrics = Metrics(start_time=0.0)
    log = JSONLinesLog(str(tmp_path / "audit.jsonl"), MemoryReactorClock())
    log.open()
    auditor = Auditor(lambda: 1000.0, sinks=[log, metrics.decision])
    cases = [
        (Protocol.HTTP, "a.example", None, 4),
        (Protocol.HTTPS_CONNECT, "b.example", Reason.NOT_ALLOWED, 3),
        (Protocol.SOCKS5_TCP, "c.example", Reason.DENIED, 2),
        (Protocol.HTTPS_CONNECT, "d.example", Reason.UPSTREAM_CONNECT_FAILED, 1),
    ]
    for protocol, host, reason, count in cases:
        decision = Decision.ALLOW if reason is None else Decision.DENY
        for _ in range(count):
            proxied = ProxyRequest(protocol, host, 443)
            auditor.record(Verdict(proxied, host, decision, Source.BASELINE_POLICY, reason))
    log.close()
    from_log: Dict[Tuple[str, str], int] = {}
    for line in (tmp_path / "audit.jsonl").read_text().splitlines():
        fields = json.loads(line)
        key = (fields["network.policy.decision"], fields["network.policy.reason"])
        from_log[key] = from_log.get(key, 0) + 1
    scraped: Dict[Tuple[str, str], float] = {}
    for (name, labels), value in parsed(request(make_site(metrics), "/metrics").body).items():
        if name == "codexproxy_decisions_total":
            key = (dict(labels)["decision"], dict(labels)["reason"])
            scraped[key] = scraped.get(key, 0) + value
    assert scraped == from_log == {
        ("allow", "allowed"): 4,
        ("deny", "not_allowed"): 3,
        ("deny", "denied"): 2,
        ("deny", "upstream_connect_failed"): 1,
    }
