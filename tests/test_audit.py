"""
Audit events (SPEC §9.3): the exact field set of each kind of decision, the
JSON-lines file and the OpenTelemetry sink.
"""

from __future__ import annotations

import json
import re
import types
from typing import Any, Dict, List

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from codex_proxy.audit import JSONLinesLog, _Lines, otel_sink
from codex_proxy.decider import Allow
from codex_proxy.model import Decision, Mode, Protocol, ProxyRequest, Reason, Source, Verdict
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.testing import RecordingAuditor, StaticResolver
from support.disk import FullDisk

NOW = 1_700_000_000.25
STAMP = "2023-11-14T22:13:20.250Z"
CLIENT = "127.0.0.1:5000"


def decide(request: ProxyRequest, decider: Any = None, **policy: Any) -> Dict[str, Any]:
    clock = MemoryReactorClock()
    clock.advance(NOW)
    auditor = RecordingAuditor(clock.seconds)
    policy.setdefault("allowed", ["a.test"])
    policy.setdefault("denied", ["bad.test"])
    service = PolicyService(
        Policy.build(**policy),
        resolver=StaticResolver({"a.test": ["203.0.114.1"], "other.test": ["203.0.114.2"]}),
        clock=clock,
        auditor=auditor,
        decider=decider,
    )
    service.check(request)
    (event,) = auditor.events
    return event


def expected(**fields: Any) -> Dict[str, Any]:
    base = {
        "event.name": "codex.network_proxy.policy_decision",
        "event.timestamp": STAMP,
        "network.policy.scope": "domain",
        "network.policy.decision": "deny",
        "network.policy.source": "baseline_policy",
        "network.policy.reason": "not_allowed",
        "network.transport.protocol": "http",
        "server.address": "a.test",
        "server.port": 80,
        "http.request.method": "GET",
        "client.address": CLIENT,
        "network.policy.override": False,
    }
    base.update({key.replace("_", "."): value for key, value in fields.items()})
    return base


def http(host: str, method: str = "GET", port: int = 80) -> ProxyRequest:
    return ProxyRequest(Protocol.HTTP, host, port, method=method, client=CLIENT)


@pytest.mark.parametrize(
    "request_, policy, fields",
    [
        (http("A.test"), {}, {"network_policy_decision": "allow", "network_policy_reason": "allowed"}),
        (http("other.test"), {}, {"server_address": "other.test"}),
        (http("bad.test"), {}, {"server_address": "bad.test", "network_policy_reason": "denied"}),
        (
            http("127.0.0.1", port=8080),
            {},
            {
                "server_address": "127.0.0.1",
                "server_port": 8080,
                "network_policy_reason": "not_allowed_local",
            },
        ),
        (
            http("a.test", "POST"),
            {"mode": Mode.LIMITED},
            {
                "network_policy_scope": "non_domain",
                "network_policy_source": "mode_guard",
                "network_policy_reason": "method_not_allowed",
                "http_request_method": "POST",
            },
        ),
        (
            ProxyRequest(Protocol.SOCKS5_UDP, "other.test", 53, client=CLIENT),
            {},
            {
                "server_address": "other.test",
                "server_port": 53,
                "network_transport_protocol": "socks5_udp",
                "http_request_method": "none",
            },
        ),
        (
            http("a.test"),
            {"enabled": False},
            {
                "network_policy_scope": "non_domain",
                "network_policy_source": "proxy_state",
                "network_policy_reason": "proxy_disabled",
            },
        ),
    ],
    ids=["allow", "miss", "deny", "local", "method", "socks-udp-drop", "disabled"],
)
def test_exact_fields(request_, policy, fields):
    assert decide(request_, **policy) == expected(**fields)


def test_decider_override_fields():
    event = decide(http("other.test"), decider=lambda r: Allow())
    assert event == expected(
        server_address="other.test",
        network_policy_decision="allow",
        network_policy_source="decider",
        network_policy_reason="allowed",
        network_policy_override=True,
    )


def test_unix_socket_allow_is_non_domain():
    clock = MemoryReactorClock()
    clock.advance(NOW)
    auditor = RecordingAuditor(clock.seconds)
    request = ProxyRequest(
        Protocol.HTTP, "unix-socket", 0, method="GET", client=CLIENT, unix_socket="/run/a.sock"
    )
    auditor.record(Verdict(request, "unix-socket", Decision.ALLOW, Source.BASELINE_POLICY))
    assert auditor.events == [
        expected(
            network_policy_scope="non_domain",
            network_policy_decision="allow",
            network_policy_reason="allowed",
            server_address="unix-socket",
            server_port=0,
        )
    ]


def test_timestamp_is_rfc3339_utc_millis():
    event = decide(http("a.test"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["event.timestamp"])


def test_metadata_is_added_and_events_go_through_twisted_logger():
    seen: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        auditor = RecordingAuditor(lambda: NOW)
        auditor.metadata.update({"conversation.id": "c-1", "app.version": "1.2"})
        auditor.record(Verdict(http("a.test"), "a.test", Decision.ALLOW, Source.BASELINE_POLICY))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    (logged,) = [e for e in seen if "audit" in e]
    assert logged["log_namespace"] == "codex_otel.network_proxy"
    assert logged["audit"]["conversation.id"] == "c-1"
    assert logged["audit"]["app.version"] == "1.2"


def test_a_repeated_verdict_is_stamped_anew_with_the_metadata_of_the_moment():
    # The auditor keeps a verdict's fields for the next request it answers:
    # each event still gets its own time, the metadata in force, and a
    # mapping of its own.
    clock = MemoryReactorClock()
    auditor = RecordingAuditor(clock.seconds)
    verdict = Verdict(http("a.test"), "a.test", Decision.ALLOW, Source.BASELINE_POLICY)
    first = auditor.record(verdict)
    clock.advance(1.5)
    auditor.metadata["conversation.id"] = "c-2"
    second = auditor.record(verdict)
    first["server.address"] = "changed by a sink"
    third = auditor.record(Verdict(http("b.test"), "b.test", Decision.ALLOW, Source.BASELINE_POLICY))
    assert [e["event.timestamp"] for e in auditor.events] == [
        "1970-01-01T00:00:00.000Z",
        "1970-01-01T00:00:01.500Z",
        "1970-01-01T00:00:01.500Z",
    ]
    assert "conversation.id" not in first
    assert second["conversation.id"] == third["conversation.id"] == "c-2"
    assert (second["server.address"], third["server.address"]) == ("a.test", "b.test")
    assert auditor.record(verdict)["server.address"] == "a.test"


def test_json_lines_are_buffered_then_flushed_by_the_clock(tmp_path):
    clock = MemoryReactorClock()
    path = tmp_path / "audit.jsonl"
    log = JSONLinesLog(str(path), clock, interval=1.0)
    log.open()
    log({"event.name": "a", "server.port": 1})
    log({"event.name": "b", "server.port": 2})
    assert path.read_text() == ""
    clock.advance(1.0)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"event.name": "a", "server.port": 1},
        {"event.name": "b", "server.port": 2},
    ]
    log({"event.name": "c"})
    log.close()
    assert len(path.read_text().splitlines()) == 3
    assert clock.getDelayedCalls() == []


def _lines_of(tmp_path, events):
    """
    What C{--audit-log} writes for C{events}, line by line.
    """
    path = tmp_path / "audit.jsonl"
    log = JSONLinesLog(str(path), MemoryReactorClock())
    log.open()
    for event in events:
        log(event)
    log.close()
    return path.read_text().splitlines()


def test_each_json_line_is_its_own_events_whatever_was_written_before(tmp_path):
    """
    Lines are encoded once per content but the timestamp (from a content's
    second event): each still reads as its own event, exactly as encoding
    it whole would write it, when timestamps, values or the keys around the
    same values change, when a value is what stands for the timestamp
    meanwhile, and past the number of contents kept.
    """
    base = {"event.name": "e", "event.timestamp": STAMP, "server.port": 1, "client.identity": "c"}
    contents = [
        base,
        {**base, "server.port": 2},
        {"event.name": "e", "event.timestamp": STAMP, "server.port": 1, "client.address": "c"},
        {**base, "client.identity": "\x00timestamp\x00"},
        {"event.name": "\x00timestamp\x00", "event.timestamp": STAMP},
        {**base, "event.timestamp": "\x00timestamp\x00"},
        {**base, "event.timestamp": 'with "quotes" and \u00e9'},
        {"event.name": "no timestamp"},
        {**base, "app.tags": ["a", "b"]},
        *({**base, "server.port": port} for port in range(300)),
        base,
    ]
    # Each content three times, the timestamp moving on.
    events = [
        {**event, "event.timestamp": f"{event['event.timestamp']}{n}"} if "event.timestamp" in event else event
        for event in contents
        for n in ("", "1", "2")
    ]
    lines = _lines_of(tmp_path, events)
    assert lines == [json.dumps(event, separators=(",", ":")) for event in events]
    assert [json.loads(line) for line in lines] == events


def test_json_line_contents_kept_are_bounded():
    encode = _Lines(size=4)
    for port in range(10):
        for stamp in ("a", "b"):
            event = {"event.name": "e", "event.timestamp": stamp, "server.port": port}
            assert encode(event) == json.dumps(event, separators=(",", ":")) + "\n"
    assert 0 < len(encode._known) <= 4


def test_json_lines_flush_early_when_the_buffer_is_full(tmp_path):
    clock = MemoryReactorClock()
    path = tmp_path / "audit.jsonl"
    log = JSONLinesLog(str(path), clock, limit=100)
    log.open()
    log({"x": "y" * 120})
    assert len(path.read_text().splitlines()) == 1
    log.close()


def test_a_full_disk_keeps_whole_lines_logs_once_and_recovers(tmp_path):
    messages: List[str] = []

    def observer(event: Dict[str, Any]) -> None:
        if "audit log" in event.get("log_format", ""):
            messages.append(event["log_format"])

    clock = MemoryReactorClock()
    path = tmp_path / "a.jsonl"
    disk = FullDisk(room=30)
    log = JSONLinesLog(str(path), clock, write=disk)
    log.open()
    globalLogPublisher.addObserver(observer)
    try:
        log({"n": 1})
        clock.advance(1.0)
        for n in (2, 3, 4):  # half of line 2 fits, then the disk is full
            log({"n": n, "pad": "x" * 10})
            clock.advance(1.0)
        assert [json.loads(line) for line in path.read_text().splitlines()] == [{"n": 1}]
        disk.room = 1 << 20  # space freed
        log({"n": 5})
        log.close()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 5]
    assert path.read_text().endswith("}\n")
    assert [m.split(":")[0] for m in messages] == [
        "cannot write the audit log {path}",
        "the audit log {path} is writable again; {count} lines were dropped",
    ]


def test_otel_sink_only_with_an_endpoint_and_the_package():
    assert otel_sink({}) is None

    def missing(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    assert otel_sink({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, missing) is None


def test_otel_sink_emits_one_record_per_event_and_shuts_down():
    emitted: List[Any] = []
    calls: List[str] = []

    class Record:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    class Provider:
        def add_log_record_processor(self, processor: Any) -> None:
            calls.append(f"processor:{processor.exporter.name}")

        def get_logger(self, name: str) -> Any:
            calls.append(f"logger:{name}")
            return types.SimpleNamespace(emit=emitted.append)

        def shutdown(self) -> None:
            calls.append("shutdown")

    modules = {
        "opentelemetry._logs": types.SimpleNamespace(LogRecord=Record),
        "opentelemetry.sdk._logs": types.SimpleNamespace(LoggerProvider=Provider),
        "opentelemetry.sdk._logs.export": types.SimpleNamespace(
            BatchLogRecordProcessor=lambda exporter: types.SimpleNamespace(exporter=exporter)
        ),
        "opentelemetry.exporter.otlp.proto.http._log_exporter": types.SimpleNamespace(
            OTLPLogExporter=lambda: types.SimpleNamespace(name="otlp")
        ),
    }
    sink = otel_sink({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, modules.__getitem__)
    assert sink is not None
    fields = expected()
    sink(fields)
    sink.close()
    (record,) = emitted
    assert record.body == "codex.network_proxy.policy_decision"
    assert record.attributes == fields
    assert record.timestamp == 1_700_000_000_250_000_000
    assert calls == ["processor:otlp", "logger:codex_otel.network_proxy", "shutdown"]


def test_process_log_text_is_for_blocks_only():
    """
    Every decision reaches twisted.logger with its fields; only blocked ones
    carry a text line for the process log (allowed ones would cost a
    formatted line per request).
    """
    from codex_proxy.audit import NAMESPACE
    from twisted.logger import formatEvent

    seen: List[Dict[str, Any]] = []

    def observer(event: Dict[str, Any]) -> None:
        if event.get("log_namespace") == NAMESPACE:
            seen.append(event)

    auditor = RecordingAuditor(lambda: NOW)
    allowed = Verdict(http("a.test"), "a.test", Decision.ALLOW, Source.BASELINE_POLICY)
    denied = Verdict(
        http("b.test"), "b.test", Decision.DENY, Source.BASELINE_POLICY, Reason.NOT_ALLOWED
    )
    globalLogPublisher.addObserver(observer)
    try:
        auditor.record(allowed)
        auditor.record(denied)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [e["audit"]["server.address"] for e in seen] == ["a.test", "b.test"]
    assert seen[0].get("log_format") is None
    assert formatEvent(seen[1]) == "policy decision deny (not_allowed) for http b.test:80"


def test_a_structured_event_is_what_logger_emit_would_send():
    from twisted.logger import Logger, LogLevel

    from codex_proxy.audit import emit_structured

    seen: List[Dict[str, Any]] = []
    logger = Logger(namespace="codex_proxy.test", source=object(), observer=seen.append)
    logger.emit(LogLevel.info, None, connection="c")
    emit_structured(logger, connection="c")
    emitted, structured = seen
    assert structured["log_time"] >= emitted["log_time"]
    assert {**structured, "log_time": None} == {**emitted, "log_time": None}
