"""
Tests for L{codex_proxy.metrics}: what an operator scraping C{/metrics}
sees after a stream of events.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import attrs
from prometheus_client import REGISTRY, generate_latest

from codex_proxy.audit import Auditor
from codex_proxy.metrics import Metrics
from codex_proxy.model import Decision, Protocol, ProxyRequest, Reason, Source, Verdict
from support.metrics import value


@attrs.frozen
class Ended:
    """
    A client connection's outcome event, shaped like
    L{codex_proxy.connections.ConnectionOutcome}.
    """

    listener: str
    outcome: str
    bytes_up: int = 0
    bytes_down: int = 0
    tunnel: bool = False
    client: Optional[str] = "127.0.0.1:40000"
    decision: Optional[str] = None
    reason: Optional[str] = None
    duration: float = 0.5


def fields(
    decision: str = "deny",
    reason: str = "not_allowed",
    protocol: str = "http",
    host: str = "blocked.example",
    identity: Optional[str] = None,
) -> Dict[str, Any]:
    event = {
        "network.policy.decision": decision,
        "network.policy.reason": reason,
        "network.transport.protocol": protocol,
        "server.address": host,
        "server.port": 443,
    }
    if identity is not None:
        event["client.identity"] = identity
    return event


def test_decisions_counted_by_decision_reason_protocol() -> None:
    """
    Each decision event adds one to the series of its decision, reason,
    protocol and client.
    """
    metrics = Metrics(start_time=1000.0)
    for _ in range(3):
        metrics.decision(fields())
    metrics.decision(fields("allow", "allowed", "https_connect"))
    assert value(
        metrics,
        "codexproxy_decisions_total",
        decision="deny",
        reason="not_allowed",
        protocol="http",
        client="anonymous",
    ) == 3
    assert value(
        metrics,
        "codexproxy_decisions_total",
        decision="allow",
        reason="allowed",
        protocol="https_connect",
        client="anonymous",
    ) == 1


def test_auditor_sink() -> None:
    """
    L{Metrics.decision} plugs into an L{Auditor} as a sink: every recorded
    verdict is counted.
    """
    metrics = Metrics(start_time=0.0)
    auditor = Auditor(lambda: 1.5, sinks=[metrics.decision])
    request = ProxyRequest(Protocol.SOCKS5_TCP, "x.example", 22, command="ci-agent", client_identity="ci-agent")
    auditor.record(
        Verdict(
            request, "x.example", Decision.DENY, Source.BASELINE_POLICY, Reason.DENIED
        )
    )
    assert value(
        metrics,
        "codexproxy_decisions_total",
        decision="deny",
        reason="denied",
        protocol="socks5_tcp",
        client="other",
    ) == 1


def test_client_label_bounded() -> None:
    """
    Only configured client names become label values; any other identity
    (a SOCKS username made up by the client) is C{other}, and no host name
    ever appears in the exposition.
    """
    metrics = Metrics(start_time=0.0, clients=["ci-agent"])
    metrics.decision(fields(identity="ci-agent"))
    for n in range(50):
        metrics.decision(fields(identity=f"made-up-{n}", host=f"h{n}.example"))
    text = generate_latest(metrics.registry).decode()
    assert "made-up" not in text and ".example" not in text
    assert value(
        metrics,
        "codexproxy_decisions_total",
        decision="deny",
        reason="not_allowed",
        protocol="http",
        client="other",
    ) == 50
    assert value(
        metrics,
        "codexproxy_decisions_total",
        decision="deny",
        reason="not_allowed",
        protocol="http",
        client="ci-agent",
    ) == 1


def test_set_clients_after_reload() -> None:
    """
    A client added by a reload gets its own series from then on.
    """
    metrics = Metrics(start_time=0.0)
    metrics.decision(fields(identity="new-agent"))
    metrics.set_clients(["new-agent"])
    metrics.decision(fields(identity="new-agent"))
    labels = dict(decision="deny", reason="not_allowed", protocol="http")
    assert value(metrics, "codexproxy_decisions_total", client="other", **labels) == 1
    assert value(metrics, "codexproxy_decisions_total", client="new-agent", **labels) == 1


def test_unknown_label_values_become_other() -> None:
    """
    A value outside a label's vocabulary is exported as C{other}, never
    verbatim.
    """
    metrics = Metrics(start_time=0.0)
    metrics.decision(fields("perhaps", "evil.example", "gopher"))
    metrics.decision(fields("perhaps", "evil.example", "gopher"))
    assert value(
        metrics,
        "codexproxy_decisions_total",
        decision="other",
        reason="other",
        protocol="other",
        client="anonymous",
    ) == 2
    assert "evil.example" not in generate_latest(metrics.registry).decode()


def test_connections_and_tunnels_open() -> None:
    """
    The gauges follow opened connections and tunnels; the outcome closes
    them and adds the bytes relayed each way.
    """
    metrics = Metrics(start_time=0.0)
    assert value(metrics, "codexproxy_connections_open", listener="http") == 0
    metrics.connection_opened("http")
    metrics.connection_opened("http")
    metrics.connection_opened("socks5")
    metrics.tunnel_opened("http")
    assert value(metrics, "codexproxy_connections_open", listener="http") == 2
    assert value(metrics, "codexproxy_tunnels_open", listener="http") == 1
    metrics.connection_closed(Ended("http", "closed", 100, 2000, tunnel=True))
    metrics.connection_closed(Ended("socks5", "blocked", decision="deny", reason="denied"))
    assert value(metrics, "codexproxy_connections_open", listener="http") == 1
    assert value(metrics, "codexproxy_connections_open", listener="socks5") == 0
    assert value(metrics, "codexproxy_tunnels_open", listener="http") == 0
    assert value(metrics, "codexproxy_relayed_bytes_total", direction="up") == 100
    assert value(metrics, "codexproxy_relayed_bytes_total", direction="down") == 2000
    assert value(
        metrics, "codexproxy_connections_total", listener="http", outcome="closed"
    ) == 1
    assert value(
        metrics, "codexproxy_connections_total", listener="socks5", outcome="blocked"
    ) == 1


def test_unknown_listener_and_outcome() -> None:
    """
    An outcome word or listener name outside the vocabularies is counted
    as C{other}, and opening and closing still balance.
    """
    metrics = Metrics(start_time=0.0)
    metrics.connection_opened("carrier-pigeon")
    metrics.connection_closed(Ended("carrier-pigeon", "eaten"))
    assert value(metrics, "codexproxy_connections_open", listener="other") == 0
    assert value(
        metrics, "codexproxy_connections_total", listener="other", outcome="other"
    ) == 1


def test_histograms() -> None:
    """
    Decision and connect times land in their histograms' buckets.
    """
    metrics = Metrics(start_time=0.0)
    metrics.observe_decision(0.0003)
    metrics.observe_decision(0.2)
    metrics.observe_connect(0.04)
    assert value(metrics, "codexproxy_decision_seconds_count") == 2
    assert value(metrics, "codexproxy_decision_seconds_bucket", le="0.0005") == 1
    assert value(metrics, "codexproxy_decision_seconds_bucket", le="0.25") == 2
    assert value(metrics, "codexproxy_upstream_connect_seconds_bucket", le="0.05") == 1
    assert value(metrics, "codexproxy_upstream_connect_seconds_bucket", le="0.025") == 0


def test_audit_reloads_start_time() -> None:
    """
    Audit lines written and dropped, reloads by result, and the start time.
    """
    metrics = Metrics(start_time=1_700_000_000.0)
    metrics.audit_written(7)
    metrics.audit_dropped(2)
    metrics.reloaded(True)
    metrics.reloaded(False)
    metrics.reloaded(True)
    assert value(metrics, "codexproxy_audit_lines_total", result="written") == 7
    assert value(metrics, "codexproxy_audit_lines_total", result="dropped") == 2
    assert value(metrics, "codexproxy_reloads_total", result="ok") == 2
    assert value(metrics, "codexproxy_reloads_total", result="failed") == 1
    assert value(metrics, "codexproxy_start_time_seconds") == 1_700_000_000.0


def test_own_registry() -> None:
    """
    Two proxies in one process keep separate figures, and nothing is put
    in prometheus_client's global registry.
    """
    first, second = Metrics(start_time=0.0), Metrics(start_time=0.0)
    first.decision(fields())
    labels = dict(decision="deny", reason="not_allowed", protocol="http")
    assert value(second, "codexproxy_decisions_total", client="anonymous", **labels) is None
    assert "codexproxy" not in generate_latest(REGISTRY).decode()
