"""
Audit events: one structured event per policy decision (SPEC §9.3).

Events go through C{twisted.logger} in the namespace
C{codex_otel.network_proxy}; the flat, dotted field mapping is under the
event key C{"audit"}. The same mapping is handed to the auditor's sinks: a
L{JSONLinesLog} (C{--audit-log}) and, when configured, an OpenTelemetry
exporter (L{otel_sink}). Sinks belong to one auditor, so two proxies in one
process never write each other's events. Nothing here ever sees a URL path,
a query or a credential: the fields are built from a L{Verdict} alone.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Set

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from codex_proxy.addresses import authority
from codex_proxy._text import escape
from codex_proxy.interfaces import IAuditor
from codex_proxy.model import PerVerdict, ProxyRequest, Source, Verdict

EVENT_NAME = "codex.network_proxy.policy_decision"
NAMESPACE = "codex_otel.network_proxy"


#: Decisions that are about the proxy's state or the request's kind rather
#: than its destination host (the Rust original's C{non_domain} events).
_NON_DOMAIN_SOURCES = frozenset({Source.MODE_GUARD, Source.PROXY_STATE})

Sink = Callable[[Dict[str, Any]], None]

_log = Logger(namespace=NAMESPACE)
_ownLog = Logger()


def emit_structured(logger: Logger, **fields: object) -> None:
    """
    Emit C{fields} to C{logger}'s observers as an info event with no text,
    as C{logger.emit(LogLevel.info, None, **fields)} would. That checks its
    level by sorting every level on each call, which cost about as much as
    the rest of it; these events (a decision, a connection's outcome) are
    sent for every request and connection.
    """
    # Item by item: update() with keywords builds a second dict first.
    fields["log_logger"] = logger
    fields["log_level"] = LogLevel.info
    fields["log_namespace"] = logger.namespace
    fields["log_source"] = logger.source
    fields["log_format"] = None
    fields["log_time"] = time.time()
    logger.observer(fields)


def rfc3339(seconds: float) -> str:
    """
    Format a POSIX timestamp as RFC 3339 UTC with milliseconds and C{Z}.
    """
    return _millisecond(round(seconds * 1000))


@functools.lru_cache(maxsize=4)
def _millisecond(millis: int) -> str:
    # Every decision within one millisecond shares its timestamp: format it
    # once (a busy proxy decides several times a millisecond).
    whole, part = divmod(millis, 1000)
    return f"{_whole_seconds(whole)}.{part:03d}Z"


@functools.lru_cache(maxsize=4)
def _whole_seconds(whole: int) -> str:
    # Every millisecond of one second shares this part: format it once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def scope(verdict: Verdict) -> str:
    """
    C{non_domain} for mode-guard and proxy-state decisions and unix-socket
    targets, C{domain} for everything decided about a destination host.
    """
    if verdict.source in _NON_DOMAIN_SOURCES or verdict.request.unix_socket is not None:
        return "non_domain"
    return "domain"


def _client(request: ProxyRequest) -> str:
    """The C{client.address} of an event about C{request}."""
    return request.client or "unknown"


def decision_fields(
    verdict: Verdict, timestamp: float, metadata: Mapping[str, str] = {}
) -> Dict[str, Any]:
    """
    The flat field mapping of one decision event.
    """
    request = verdict.request
    fields: Dict[str, Any] = {
        "event.name": EVENT_NAME,
        "event.timestamp": rfc3339(timestamp),
        "network.policy.scope": scope(verdict),
        "network.policy.decision": verdict.decision.value,
        "network.policy.source": verdict.source.value,
        "network.policy.reason": (
            verdict.reason.value if verdict.reason is not None else "allowed"
        ),
        "network.transport.protocol": request.protocol.value,
        "server.address": verdict.host,
        "server.port": request.port,
        "http.request.method": request.method or "none",
        "client.address": _client(request),
        "network.policy.override": verdict.override,
    }
    if request.client_identity is not None:
        # The authenticated client, or the RFC 1929 username a SOCKS5
        # client named itself with (never a token or password).
        fields["client.identity"] = request.client_identity
    if verdict.secret is not None:
        # The name of a misused secret (SPEC §12), never its value.
        fields["network.policy.secret"] = verdict.secret
    fields.update(metadata)
    return fields


@implementer(IAuditor)
class Auditor:
    """
    Emits decision events, stamped by an injected clock.

    @ivar metadata: optional fields added to every event
        (C{conversation.id}, C{app.version}, C{user.account_id}).
    @ivar sinks: callables each given every event's fields.
    """

    def __init__(
        self,
        seconds: Callable[[], float],
        metadata: Optional[Mapping[str, str]] = None,
        sinks: Optional[List[Sink]] = None,
    ) -> None:
        self._seconds = seconds
        self.metadata = dict(metadata or {})
        self.sinks: List[Sink] = list(sinks or [])
        self._failing: Set[int] = set()
        # The fields of recent decisions but their timestamp, client and
        # metadata: the same for every request of a kind.
        self._recent = PerVerdict(lambda verdict: decision_fields(verdict, 0.0))

    def _fields(self, verdict: Verdict) -> Dict[str, Any]:
        """
        L{decision_fields} of C{verdict}, stamped now, with the metadata.
        """
        fields = self._recent(verdict).copy()
        fields["event.timestamp"] = rfc3339(self._seconds())
        fields["client.address"] = _client(verdict.request)
        if self.metadata:
            fields.update(self.metadata)
        return fields

    def record(self, verdict: Verdict) -> Dict[str, Any]:
        """
        Hand the event to every sink and the log. A sink that raises (a
        full disk, a broken exporter) loses that event, is reported once
        until it works again, and never stops the request or the other
        sinks: the decision is made, and still logged.
        """
        fields = self._fields(verdict)
        for sink in self.sinks:
            try:
                sink(fields)
            except Exception as e:
                if id(sink) not in self._failing:
                    self._failing.add(id(sink))
                    _ownLog.error(
                        "audit sink {sink!r} failed: {error}; its events are"
                        " dropped until it works again",
                        sink=sink,
                        error=e,
                    )
            else:
                self._failing.discard(id(sink))
        if verdict.allowed:
            # Allowed decisions are the bulk of the traffic: the structured
            # event still reaches every observer, but carries no text, so the
            # human log (and its formatting cost per request) holds blocks
            # only. --audit-log has every decision.
            emit_structured(_log, audit=fields)
        else:
            _log.info(
                "policy decision {decision} ({reason}) for {protocol} {target}",
                decision=fields["network.policy.decision"],
                reason=fields["network.policy.reason"],
                protocol=fields["network.transport.protocol"],
                target=authority(escape(fields["server.address"]), fields["server.port"]),
                audit=fields,
            )
        return fields


#: C{json.dumps(..., separators=(",", ":"))} without building an encoder
#: per call (only the default separators share one), and without looking
#: for reference cycles: an event is one flat mapping of strings, numbers
#: and booleans (a quarter of the cost of encoding one).
_compact = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

_STAMP = "event.timestamp"
# Stands for the timestamp while the rest of an event is encoded: a JSON
# string no other value encodes to unless it is this very string.
_STAND_IN = "\x00timestamp\x00"
_STAND_IN_JSON = _compact(_STAND_IN)


class _Lines:
    """
    The JSON line of each event, encoded once per content but its
    timestamp: a client's requests repeat the same decision's fields (one
    verdict per kind of request and client connection), and encoding them
    was two thirds of the C{--audit-log} sink's cost. An event seen once so
    far (a new connection's, a one-off) is encoded whole; from its second
    time, around its timestamp. Keeps up to C{size} contents (then starts
    over).
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        # (keys, values but the timestamp) -> the line's text around it,
        # or () while seen once.
        self._known: Dict[tuple[tuple[str, ...], tuple[Any, ...]], tuple[str, ...]] = {}

    def __call__(self, fields: Dict[str, Any]) -> str:
        stamp = fields.get(_STAMP)
        if type(stamp) is not str:
            return _compact(fields) + "\n"
        keys = tuple(fields)
        values = list(fields.values())
        values[keys.index(_STAMP)] = None
        key = (keys, tuple(values))
        try:
            known = self._known.get(key)
        except TypeError:
            # A value that cannot be part of a key (a list): encoded whole.
            return _compact(fields) + "\n"
        if known is None:
            self._keep(key, ())
            return _compact(fields) + "\n"
        if not known:
            text = _compact({**fields, _STAMP: _STAND_IN})
            if text.count(_STAND_IN_JSON) != 1:
                # A value that is the stand-in itself: encoded whole.
                return _compact(fields) + "\n"
            before, _, after = text.partition(_STAND_IN_JSON)
            known = (before, after + "\n")
            self._keep(key, known)
        return known[0] + _compact(stamp) + known[1]

    def _keep(self, key: tuple[tuple[str, ...], tuple[Any, ...]], known: tuple[str, ...]) -> None:
        if len(self._known) >= self._size and key not in self._known:
            self._known.clear()
        self._known[key] = known


class JSONLinesLog:
    """
    The C{--audit-log} file: one JSON object per decision and line, nothing
    else. Lines are buffered and written at most C{interval} seconds after
    the first of them (or as soon as C{limit} bytes wait), and on L{close},
    so a busy proxy does one write per interval, not one per request.

    A write that fails (a full disk) is cut back off the file, so the file
    only ever holds whole lines; those lines are dropped, the error is
    logged once, and the proxy carries on. When writing works again, how
    many lines were lost is logged.

    @param write: C{os.write}, or a stand-in that fails like a full disk.
    @ivar written: if set, told how many lines each successful write
        wrote (the audit-lines metric).
    @ivar dropped: if set, told how many lines each failed write lost.
    """

    written: Optional[Callable[[int], None]] = None
    dropped: Optional[Callable[[int], None]] = None

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        interval: float = 1.0,
        limit: int = 1 << 16,
        write: Callable[[int, memoryview], int] = os.write,
    ) -> None:
        self.path = path
        self._clock = clock
        self._interval = interval
        self._limit = limit
        self._write = write
        self._fd: Optional[int] = None
        self._end = 0
        self._lines: List[str] = []
        self._size = 0
        self._timer: Optional[IDelayedCall] = None
        self._dropped = 0
        self._encode = _Lines()

    def open(self) -> None:
        """
        Open the file for appending (created if missing).

        @raise OSError: it cannot be opened.
        """
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666
        )
        self._end = os.fstat(self._fd).st_size

    def __call__(self, fields: Dict[str, Any]) -> None:
        line = self._encode(fields)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self._limit:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._interval, self.flush)

    def flush(self) -> None:
        """
        Write out what is buffered.
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        fd = self._fd
        if not lines or fd is None:
            return
        data = memoryview("".join(lines).encode("utf-8"))
        try:
            while data:
                data = data[self._write(fd, data) :]
        except OSError as e:
            self._failed(fd, len(lines), e)
            return
        self._end = os.fstat(fd).st_size
        if self.written is not None:
            self.written(len(lines))
        if self._dropped:
            _ownLog.warn(
                "the audit log {path} is writable again; {count} lines were dropped",
                path=self.path,
                count=self._dropped,
            )
            self._dropped = 0

    def _failed(self, fd: int, count: int, e: OSError) -> None:
        """
        Cut a partly written batch off the file and count its lines as lost.
        """
        try:
            os.ftruncate(fd, self._end)
        except OSError:
            pass
        if not self._dropped:
            _ownLog.error(
                "cannot write the audit log {path}: {error};"
                " audit lines are dropped until writing works again",
                path=self.path,
                error=e,
            )
        self._dropped += count
        if self.dropped is not None:
            self.dropped(count)

    def close(self) -> None:
        """
        Flush and close the file.
        """
        self.flush()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class OTelSink:
    """
    Hands each event to an OpenTelemetry logger as one log record, body the
    event name, attributes the event's fields.
    """

    def __init__(self, provider: Any, record_type: Any) -> None:
        self._provider = provider
        self._logger = provider.get_logger(NAMESPACE)
        self._record = record_type

    def __call__(self, fields: Dict[str, Any]) -> None:
        stamp = datetime.datetime.fromisoformat(fields["event.timestamp"])
        self._logger.emit(
            self._record(
                timestamp=round(stamp.timestamp() * 1000) * 1_000_000,
                severity_text="INFO",
                body=EVENT_NAME,
                attributes=dict(fields),
            )
        )

    def close(self) -> None:
        """
        Export what is still queued (the batch processor's own thread does
        the I/O; this waits for it once, at shutdown).
        """
        self._provider.shutdown()


def otel_sink(
    environ: Mapping[str, str],
    import_module: Callable[[str], Any] = importlib.import_module,
) -> Optional[OTelSink]:
    """
    An L{OTelSink} exporting over OTLP/HTTP when C{OTEL_EXPORTER_OTLP_ENDPOINT}
    is set and the C{otel} extra is installed, else C{None}. The exporter
    reads its endpoint, headers and timeouts from the standard C{OTEL_*}
    variables.
    """
    if not environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    try:
        api = import_module("opentelemetry._logs")
        sdk = import_module("opentelemetry.sdk._logs")
        export = import_module("opentelemetry.sdk._logs.export")
        otlp = import_module("opentelemetry.exporter.otlp.proto.http._log_exporter")
    except ImportError as e:
        _ownLog.warn(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not"
            " installed ({error}); install codex-proxy[otel] to export audit events",
            error=e,
        )
        return None
    provider = sdk.LoggerProvider()
    provider.add_log_record_processor(export.BatchLogRecordProcessor(otlp.OTLPLogExporter()))
    return OTelSink(provider, api.LogRecord)


__all__ = [
    "Auditor",
    "EVENT_NAME",
    "JSONLinesLog",
    "NAMESPACE",
    "OTelSink",
    "decision_fields",
    "otel_sink",
    "rfc3339",
    "scope",
]
