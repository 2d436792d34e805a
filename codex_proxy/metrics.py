"""
The counters and histograms of the operations listener (SPEC §13).

L{Metrics} owns its own C{prometheus_client} registry (never the global
one, so two proxies in one process never mix their figures) and is fed by
events, not by calls sprinkled through the listeners: every decision event
(L{Metrics.decision} is an auditor sink), every client connection's
opening, becoming a tunnel and its one outcome event, audit-log writes and
reloads. Label values are bounded: decisions, reasons, protocols and
listeners come from fixed vocabularies, and a client is named only when it
is a configured client; a host name is never a label.

The hot path (one decision count and one decision latency per request)
is counted in plain numbers that a collector hands to the registry at
scrape time; the per-connection events use C{prometheus_client}'s own
families, whose C{labels()} (slow: it validates and hashes its
arguments) runs once per label combination, its child kept.
"""

from __future__ import annotations

import bisect
import itertools
from typing import (
    AbstractSet, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Protocol, Sequence,
    Tuple, TypeVar,
)  # fmt: skip

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from codex_proxy import model
from codex_proxy.connections import Connections

#: The listeners a client connection can arrive on (the C{listener} label).
LISTENERS = frozenset({"http", "socks5"})

#: How a client connection ended (the C{outcome} label of
#: C{codexproxy_connections_total}), as
#: L{codex_proxy.connections.ConnectionOutcome} says it.
OUTCOMES = frozenset(
    {"closed", "blocked", "failed", "bad_request", "timeout", "refused", "error"}
)

#: What a decision event's C{client.identity} becomes without one.
ANONYMOUS = "anonymous"

#: The label value standing in for anything outside a bounded vocabulary.
OTHER = "other"

_DECISIONS = frozenset(d.value for d in model.Decision)
_REASONS = frozenset(r.value for r in model.Reason) | {"allowed"}
_PROTOCOLS = frozenset(p.value for p in model.Protocol)

#: Policy decisions take microseconds; the tail is DNS resolution and a
#: decider, up to their timeouts.
DECISION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: A TCP (or parent CONNECT) handshake: loopback to another continent, up
#: to the connect timeout.
CONNECT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class ConnectionEnd(Protocol):
    """
    What L{Metrics.connection_closed} reads of a client connection's one
    outcome event (L{codex_proxy.connections.ConnectionOutcome}).

    @ivar listener: where it arrived (one of L{LISTENERS}).
    @ivar outcome: how it ended (one of L{OUTCOMES}).
    @ivar bytes_up: bytes relayed from the client towards the destination.
    @ivar bytes_down: bytes relayed from the destination to the client.
    @ivar tunnel: it became a tunnel (so L{Metrics.tunnel_opened} counted
        it).
    """

    @property
    def listener(self) -> str: ...

    @property
    def outcome(self) -> str: ...

    @property
    def bytes_up(self) -> int: ...

    @property
    def bytes_down(self) -> int: ...

    @property
    def tunnel(self) -> bool: ...


class Metrics:
    """
    The metric families of SPEC §13, in a registry of their own.

    @ivar registry: what C{/metrics} exposes.
    """

    def __init__(self, start_time: float, clients: Iterable[str] = ()) -> None:
        """
        @param start_time: the POSIX time the proxy started
            (C{codexproxy_start_time_seconds}).
        @param clients: the configured client names (SPEC §11): the only
            values the C{client} label takes besides C{anonymous} and
            C{other}.
        """
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        self.set_clients(clients)
        self._decisions = _Counts(
            "codexproxy_decisions",
            "Policy decisions, one per audit event.",
            ("decision", "reason", "protocol", "client"),
            registry,
        )
        self._connections_open = Gauge(
            "codexproxy_connections_open",
            "Client connections open now.",
            ("listener",),
            registry=registry,
        )
        self._tunnels_open = Gauge(
            "codexproxy_tunnels_open",
            "Client connections relaying a tunnel now.",
            ("listener",),
            registry=registry,
        )
        self._connections_total = Counter(
            "codexproxy_connections",
            "Client connections closed, by how they ended.",
            ("listener", "outcome"),
            registry=registry,
        )
        relayed = Counter(
            "codexproxy_relayed_bytes",
            "Bytes relayed, counted when their connection closes.",
            ("direction",),
            registry=registry,
        )
        self._up = relayed.labels("up")
        self._down = relayed.labels("down")
        self._decision_seconds = _Histogram(
            "codexproxy_decision_seconds",
            "Time from a complete request to its policy verdict.",
            DECISION_BUCKETS,
            registry,
        )
        self._connect_seconds = _Histogram(
            "codexproxy_upstream_connect_seconds",
            "Time to open an outbound connection.",
            CONNECT_BUCKETS,
            registry,
        )
        audit = Counter(
            "codexproxy_audit_lines",
            "Audit log lines written, and lost to a failing write.",
            ("result",),
            registry=registry,
        )
        self._written = audit.labels("written")
        self._dropped = audit.labels("dropped")
        reloads = Counter(
            "codexproxy_reloads",
            "Configuration reloads, by result.",
            ("result",),
            registry=registry,
        )
        self._reload_ok = reloads.labels("ok")
        self._reload_failed = reloads.labels("failed")
        Gauge(
            "codexproxy_start_time_seconds",
            "When the proxy started, in seconds since the epoch.",
            registry=registry,
        ).set(start_time)
        self._open: Dict[Tuple[str, ...], Gauge] = {}
        self._tunnels: Dict[Tuple[str, ...], Gauge] = {}
        self._ended: Dict[Tuple[str, ...], Counter] = {}
        for listener in sorted(LISTENERS):
            # Present (at 0) from the start, so a dashboard sees them.
            self._gauge(self._connections_open, self._open, listener)
            self._gauge(self._tunnels_open, self._tunnels, listener)

    def set_clients(self, clients: Iterable[str]) -> None:
        """
        After a reload: the configured client names are now C{clients}.
        Series already exported keep their values.
        """
        self._clients = frozenset(clients)
        self._decision_labels = (
            _DECISIONS, _REASONS, _PROTOCOLS, self._clients | {ANONYMOUS, OTHER}
        )  # fmt: skip

    def attach(self, sinks: List[Callable[[Dict[str, Any]], None]], connections: Connections) -> None:
        """
        Be fed by these events: every decision (one of an auditor's
        C{sinks}) and every client connection's opening, tunnel and
        outcome in C{connections}.
        """
        sinks.append(self.decision)
        connections.open_observers.append(self.connection_opened)
        connections.tunnel_observers.append(self.tunnel_opened)
        connections.observers.append(self.connection_closed)

    # Decision events.

    def decision(self, fields: Mapping[str, Any]) -> None:
        """
        Count one decision event: an auditor sink, given the flat fields
        of SPEC §9.3.
        """
        identity = fields.get("client.identity")
        if identity is None:
            identity = ANONYMOUS
        elif identity not in self._clients:
            identity = OTHER
        key = (
            fields["network.policy.decision"],
            fields["network.policy.reason"],
            fields["network.transport.protocol"],
            identity,
        )
        counts = self._decisions.counts
        if key in counts:
            counts[key] += 1
        else:
            # Only keys within bounds are kept, so odd values cannot grow it.
            bounded = _bounded(key, self._decision_labels)
            counts[bounded] = counts.get(bounded, 0) + 1

    def observe_decision(self, seconds: float) -> None:
        """
        One request's time from its complete head to its verdict.
        """
        self._decision_seconds.observe(seconds)

    def observe_connect(self, seconds: float) -> None:
        """
        One outbound connection's time to connect (successful or not).
        """
        self._connect_seconds.observe(seconds)

    # Connection events.

    def connection_opened(self, listener: str) -> None:
        """
        A client connection was accepted on C{listener}.
        """
        self._gauge(self._connections_open, self._open, listener).inc()

    def tunnel_opened(self, listener: str) -> None:
        """
        A client connection on C{listener} became a tunnel; its outcome
        will say C{tunnel}.
        """
        self._gauge(self._tunnels_open, self._tunnels, listener).inc()

    def connection_closed(self, outcome: ConnectionEnd) -> None:
        """
        A client connection ended: its outcome event.
        """
        listener = outcome.listener
        self._gauge(self._connections_open, self._open, listener).dec()
        if outcome.tunnel:
            self._gauge(self._tunnels_open, self._tunnels, listener).dec()
        if outcome.bytes_up:
            self._up.inc(outcome.bytes_up)
        if outcome.bytes_down:
            self._down.inc(outcome.bytes_down)
        key = (listener, outcome.outcome)
        ended = self._ended.get(key)
        if ended is None:
            ended = _bind(self._connections_total, self._ended, key, (LISTENERS, OUTCOMES))
        ended.inc()

    @staticmethod
    def _gauge(family: Gauge, cache: Dict[Tuple[str, ...], Gauge], listener: str) -> Gauge:
        key = (listener,)
        child = cache.get(key)
        if child is None:
            child = _bind(family, cache, key, (LISTENERS,))
        return child

    # Audit log and reloads.

    def audit_written(self, lines: int) -> None:
        """
        C{lines} audit lines reached the audit log.
        """
        self._written.inc(lines)

    def audit_dropped(self, lines: int) -> None:
        """
        C{lines} audit lines were lost to a failing write.
        """
        self._dropped.inc(lines)

    def reloaded(self, ok: bool) -> None:
        """
        A configuration reload finished; C{ok} says whether it took effect.
        """
        (self._reload_ok if ok else self._reload_failed).inc()


class _Histogram(Collector):
    """
    A histogram without labels, counted in plain numbers: one observation
    per decision is on the keep-alive hot path, and
    C{prometheus_client.Histogram} takes two locks and validates its state
    on each (everything here runs in the reactor thread). The registry
    still renders it (C{HistogramMetricFamily}).
    """

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(buckets)
        self._les = [floatToGoString(bound) for bound in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        # Buckets are "less or equal": the first bound >= value.
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative = itertools.accumulate(self._counts)
        yield HistogramMetricFamily(
            self._name,
            self._documentation,
            buckets=list(zip(self._les, cumulative)),
            sum_value=self._sum,
        )


class _Counts(Collector):
    """
    A labelled counter in plain numbers, for the same reason as
    L{_Histogram}: one count per decision is on the hot path.

    @ivar counts: label values (in the order of C{labels}) -> count.
    """

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = labels
        self.counts: Dict[Tuple[str, ...], int] = {}
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for key, count in self.counts.items():
            family.add_metric(key, count)
        yield family


_T = TypeVar("_T")


def timed(
    d: "defer.Deferred[_T]",
    clock: IReactorTime,
    observe: Callable[[float], None],
    started: float,
) -> "defer.Deferred[_T]":
    """
    C{d}, which tells C{observe} how many seconds after C{started} it
    fired, successful or not; a cancelled attempt (its client left) is no
    measurement. An answer that is already there (most decisions) is
    measured at once, without adding a callback.
    """
    if d.called:
        _measured(d.result, clock, observe, started)
        return d
    return d.addBoth(_measured, clock, observe, started)


def _measured(
    result: Any, clock: IReactorTime, observe: Callable[[float], None], started: float
) -> Any:
    if not (isinstance(result, Failure) and result.check(defer.CancelledError)):
        observe(clock.seconds() - started)
    return result


_Family = TypeVar("_Family", Counter, Gauge)


def _bind(
    family: _Family,
    cache: Dict[Tuple[str, ...], _Family],
    key: Tuple[str, ...],
    vocabularies: Sequence[AbstractSet[str]],
) -> _Family:
    """
    The child of C{family} for the label values C{key}, each value outside
    its vocabulary exported as C{other}. Only keys already within bounds
    are remembered in C{cache}, so odd values cannot grow it.
    """
    bounded = _bounded(key, vocabularies)
    child = family.labels(*bounded)
    if bounded == key:
        cache[key] = child
    return child


def _bounded(key: Tuple[str, ...], vocabularies: Sequence[AbstractSet[str]]) -> Tuple[str, ...]:
    """
    C{key} with each value outside its vocabulary replaced by C{other}.
    """
    return tuple(v if v in known else OTHER for v, known in zip(key, vocabularies))


__all__ = [
    "ANONYMOUS",
    "CONNECT_BUCKETS",
    "ConnectionEnd",
    "DECISION_BUCKETS",
    "LISTENERS",
    "Metrics",
    "OTHER",
    "OUTCOMES",
    "timed",
]
