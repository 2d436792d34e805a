"""
What the metrics cost per event, in microseconds: one decision event
through L{codex_proxy.metrics.Metrics.decision} (the auditor sink), one
connection opened and closed with its outcome, and for comparison the
naive C{Counter.labels(...).inc()} the cached children avoid.

    .venv/bin/python -m bench.metrics_hotpath [N]
"""

from __future__ import annotations

import sys
import timeit
from typing import Callable

from prometheus_client import CollectorRegistry, Counter

import attrs

from codex_proxy.metrics import Metrics

_FIELDS = {
    "network.policy.decision": "allow",
    "network.policy.reason": "allowed",
    "network.transport.protocol": "http",
    "server.address": "api.example.com",
    "server.port": 443,
}


@attrs.frozen
class _Ended:
    """
    An outcome event shaped like L{codex_proxy.connections.ConnectionOutcome}.
    """

    listener: str = "http"
    outcome: str = "closed"
    bytes_up: int = 512
    bytes_down: int = 4096
    tunnel: bool = False


_OUTCOME = _Ended()


def _per_call(function: Callable[[], None], number: int) -> float:
    """
    The best of five runs of C{number} calls, in microseconds per call.
    """
    best = min(timeit.repeat(function, number=number, repeat=5))
    return best / number * 1e6


def main(number: int) -> None:
    metrics = Metrics(start_time=0.0)
    naive = Counter(
        "naive_decisions",
        "the same family, labels() on every event",
        ("decision", "reason", "protocol", "client"),
        registry=CollectorRegistry(),
    )

    def decision() -> None:
        metrics.decision(_FIELDS)

    def connection() -> None:
        metrics.connection_opened("http")
        metrics.connection_closed(_OUTCOME)

    def labels() -> None:
        naive.labels("allow", "allowed", "http", "anonymous").inc()

    print(f"decision event (cached child):      {_per_call(decision, number):.2f} us")
    print(f"connection opened + outcome closed: {_per_call(connection, number):.2f} us")
    print(f"naive labels().inc() per decision:  {_per_call(labels, number):.2f} us")
    observe = _per_call(lambda: metrics.observe_decision(0.0004), number)
    print(f"decision histogram observe:         {observe:.2f} us")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
