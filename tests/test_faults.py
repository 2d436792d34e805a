"""
Faults on either side of the HTTP listener, in memory: each ends in a
defined outcome the client sees, the decision's audit event, and the proxy
serving the next request normally.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy.audit import JSONLinesLog
from codex_proxy.decider import Allow
from support.disk import FullDisk
from support.http import HalfCloseTransport, Harness

GET = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def events(h: Harness) -> List[tuple]:
    return [
        (e["server.address"], e["network.policy.decision"], e["network.policy.reason"])
        for e in h.auditor.events
    ]


def next_request_succeeds(h: Harness) -> None:
    """
    A new client of the same listener gets an ordinary answer.
    """
    h.proto = h.factory.buildProtocol(None)
    h.client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5556))
    h.proto.makeConnection(h.client)
    h.send(GET)
    server, upstream = h.accept()
    assert upstream.value().startswith(b"GET / HTTP/1.1\r\n")
    h.answer(server, OK)
    assert h.client.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert h.client.value().endswith(b"\r\n\r\nok")
    assert events(h)[-1] == ("origin.test", "allow", "allowed")


def test_origin_reset_mid_body_cuts_the_client_off(trickle):
    h = Harness(trickle)
    h.send(GET)
    server, _ = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd")
    server.connectionLost(Failure(error.ConnectionLost()))
    # The client has a head promising 10 bytes, 4 of them, and a closed
    # connection: it knows the body is short (no 502 can follow a 200).
    assert h.client.value().endswith(b"\r\n\r\nabcd")
    assert h.client.disconnecting
    assert events(h) == [("origin.test", "allow", "allowed")]
    next_request_succeeds(h)


def test_origin_that_never_answers_gets_504_after_the_response_timeout(trickle):
    h = Harness(trickle)
    h.send(GET)
    _, upstream = h.accept()
    h.reactor.pump([75] * 3)  # checked each quarter of the 300 s period
    assert h.client.value() == b"" and not upstream.disconnecting
    h.reactor.advance(75)
    status, headers, body = h.response()
    assert (status, headers["x-proxy-error"]) == (504, "upstream-timeout")
    assert json.loads(body)["message"] == "origin.test:80 sent no response within 300s"
    assert upstream.disconnecting
    assert events(h) == [("origin.test", "allow", "allowed")]
    # A body-less request keeps the client connection: the next one works.
    h.client.clear()
    h.send(GET)
    server, _ = h.accept()
    h.answer(server, OK)
    assert h.client.value().endswith(b"ok")


def test_origin_stalling_mid_body_closes_both_sides(trickle):
    h = Harness(trickle)
    h.send(GET)
    server, upstream = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    # The bytes are seen at the first check (75 s); silence counts from there.
    h.reactor.pump([75] * 4)
    assert not h.client.disconnecting
    h.reactor.advance(75)
    assert h.client.disconnecting and upstream.disconnecting
    next_request_succeeds(h)


def test_a_slow_upload_is_no_stall(trickle):
    h = Harness(trickle)
    h.send(b"POST http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 20\r\n\r\n")
    server, upstream = h.accept()
    for _ in range(10):  # one byte every 100 s: 1000 s in all
        h.reactor.advance(100)
        h.send(b"xx")
    h.answer(server, OK)
    assert h.client.value().endswith(b"ok")
    assert upstream.value().endswith(b"x" * 20)


def test_origin_garbage_is_502_and_the_connection_is_dropped(trickle):
    h = Harness(trickle)
    h.send(GET)
    server, upstream = h.accept()
    h.answer(server, b"\x16\x03\x01\x00garbage\r\n\r\n")
    status, headers, _ = h.response()
    assert (status, headers["x-proxy-error"]) == (502, "upstream-bad-response")
    assert upstream.disconnecting
    assert events(h) == [("origin.test", "allow", "allowed")]
    next_request_succeeds(h)


def test_client_gone_mid_upload_closes_the_destination(trickle):
    h = Harness(trickle)
    h.send(b"POST http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 10\r\n\r\nabcd")
    _, upstream = h.accept()
    assert upstream.value().endswith(b"\r\n\r\nabcd")
    h.proto.connectionLost(Failure(error.ConnectionLost()))
    assert upstream.disconnecting
    next_request_succeeds(h)


def test_client_half_close_mid_upload_aborts_both(trickle):
    h = Harness(trickle)
    h.send(b"POST http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 10\r\n\r\nabcd")
    _, upstream = h.accept()
    h.proto.readConnectionLost()
    assert h.client.disconnecting and upstream.disconnecting
    next_request_succeeds(h)


def test_client_gone_mid_download_closes_the_destination(trickle):
    h = Harness(trickle)
    h.send(GET)
    server, upstream = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd")
    h.proto.connectionLost(Failure(error.ConnectionLost()))
    assert upstream.disconnecting
    h.answer(server, b"efgh")  # late bytes go nowhere, raise nothing
    next_request_succeeds(h)


@implementer(IHostnameResolver)
class SilentFor:
    """
    Never answers for C{name}; delegates every other name.
    """

    def __init__(self, name: str, other: Any) -> None:
        self.name, self.other = name, other

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        if hostName == self.name:
            receiver.resolutionBegan(None)
            return None
        return self.other.resolveHostName(receiver, hostName, portNumber)


def test_resolver_timeout_is_502_with_its_audit_event(trickle):
    h = Harness(trickle)
    h.service._resolver = SilentFor("slow.example.com", h.resolver)
    h.send(b"GET http://slow.example.com/ HTTP/1.1\r\nHost: slow.example.com\r\n\r\n")
    h.reactor.advance(10)
    status, headers, _ = h.response()
    assert (status, headers["x-proxy-error"]) == (502, "upstream-dns-failed")
    assert h.dials() == []
    assert events(h) == [("slow.example.com", "deny", "upstream_dns_failed")]
    next_request_succeeds(h)


def _raises(request):
    raise RuntimeError("decider bug")


@pytest.mark.parametrize(
    "decider, wait, why",
    [
        (_raises, 0, "policy decider raised RuntimeError: decider bug"),
        (lambda request: defer.Deferred(), 30, "policy decider did not answer within 30.0s"),
    ],
    ids=["raises", "never-answers"],
)
def test_decider_failure_denies(trickle, decider, wait, why):
    h = Harness(trickle)
    h.service.decider = decider
    h.send(b"GET http://unlisted.test/ HTTP/1.1\r\nHost: unlisted.test\r\n\r\n")
    h.reactor.advance(wait)
    status, headers, body = h.response()
    assert (status, headers["x-proxy-error"]) == (403, "blocked-by-policy")
    assert (json.loads(body)["reason"], json.loads(body)["source"]) == ("policy_denied", "decider")
    assert events(h) == [("unlisted.test", "deny", "policy_denied")]
    assert h.service.blocked()[-1].detail == why
    assert h.dials() == []
    h.service.decider = lambda request: Allow()
    next_request_succeeds(h)


def test_audit_log_on_a_full_disk_does_not_stop_the_proxy(trickle, tmp_path):
    path = tmp_path / "audit.jsonl"
    h = Harness(trickle)
    log = JSONLinesLog(str(path), h.reactor, write=FullDisk(room=0))
    log.open()
    h.auditor.sinks.append(log)

    def raises(fields: Dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    h.auditor.sinks.append(raises)  # an embedder's sink failing the same way
    reported: List[str] = []

    def observer(event: Dict[str, Any]) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "error":
            reported.append(event["log_format"].split(":")[0])

    globalLogPublisher.addObserver(observer)
    try:
        h.send(GET)
        server, _ = h.accept()
        h.answer(server, OK)
        h.reactor.advance(1)
        assert h.client.value().endswith(b"ok")
        next_request_succeeds(h)
        h.reactor.advance(1)
    finally:
        globalLogPublisher.removeObserver(observer)
    # Both events were decided and logged; neither reached the full disk.
    assert events(h) == [("origin.test", "allow", "allowed")] * 2
    assert path.read_text() == ""
    assert reported == ["audit sink {sink!r} failed", "cannot write the audit log {path}"]
