"""
The HTTP listener over in-memory transports: every wire case is run twice,
once whole and once fed one byte at a time.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import error
from twisted.internet.interfaces import IHostnameResolver
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy._httpstates import ReadingHead
from codex_proxy.httpproxy import HTTPProxyProtocol
from codex_proxy.relay import IdleWatch, Timer
from codex_proxy.model import Mode
from codex_proxy.policy import Policy
from codex_proxy.testing import StaticResolver
from support.http import (
    PUBLIC,
    ALLOW,
    Harness,
)


def make(trickle: bool, **kw) -> Harness:
    return Harness(trickle, **kw)


def test_allowed_get_is_forwarded_in_origin_form(trickle):
    h = make(trickle)
    h.send(
        b"GET http://origin.test/path?q=1 HTTP/1.1\r\nHost: origin.test\r\n"
        b"Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n"
    )
    assert h.dials() == [(PUBLIC, 80)]
    server, upstream = h.accept()
    sent = upstream.value()
    assert sent.startswith(b"GET /path?q=1 HTTP/1.1\r\n")
    assert b"Host: origin.test\r\n" in sent
    assert b"Accept: */*\r\n" in sent
    assert b"proxy-connection" not in sent.lower()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\nhello")
    status, headers, body = h.response()
    assert (status, body) == (200, b"hello")
    assert "keep-alive" not in headers
    assert h.auditor.events[-1]["network.policy.decision"] == "allow"
    assert h.auditor.events[-1]["server.address"] == "origin.test"


def test_both_legs_forward_at_once_without_nagle(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, upstream = h.accept()
    assert (h.client.noDelay, upstream.noDelay) == (True, True)


def test_keep_alive_reuses_the_destination_connection(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, upstream = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    upstream.clear()
    h.client.clear()
    h.send(b"GET http://origin.test/b HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert len(h.dials()) == 1
    assert upstream.value().startswith(b"GET /b HTTP/1.1\r\n")
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
    assert h.response()[2] == b"b"
    assert not h.client.disconnecting


def test_pipelined_requests_are_answered_in_order(trickle):
    h = make(trickle)
    h.send(
        b"GET http://origin.test/1 HTTP/1.1\r\nHost: origin.test\r\n\r\n"
        b"GET http://origin.test/2 HTTP/1.1\r\nHost: origin.test\r\n\r\n"
    )
    server, upstream = h.accept()
    assert upstream.value().count(b"GET ") == 1
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert upstream.value().count(b"GET ") == 2
    assert b"GET /2 HTTP/1.1" in upstream.value()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert h.client.value().count(b"HTTP/1.1 200 OK") == 2
    assert h.client.value().endswith(b"2")


def test_stale_keep_alive_connection_is_retried_once(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, _ = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.send(b"GET http://origin.test/b HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server.connectionLost(Failure(error.ConnectionDone()))
    assert len(h.dials()) == 2
    server2, upstream2 = h.accept()
    assert upstream2.value().startswith(b"GET /b ")
    h.client.clear()
    h.answer(server2, b"HTTP/1.1 204 No Content\r\n\r\n")
    assert h.response()[0] == 204


def test_request_body_streams_with_content_length(trickle):
    h = make(trickle)
    h.send(b"PUT http://origin.test/up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 10\r\n\r\n01234")
    server, upstream = h.accept()
    h.send(b"56789")
    assert upstream.value().endswith(b"\r\n\r\n0123456789")
    h.answer(server, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert h.response()[0] == 201


def test_chunked_request_body_is_relayed_as_chunked(trickle):
    h = make(trickle)
    h.send(
        b"POST http://origin.test/up HTTP/1.1\r\nHost: origin.test\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    server, upstream = h.accept()
    h.send(b"3\r\nabc\r\n0\r\n\r\n")
    sent = upstream.value()
    assert b"Transfer-Encoding: chunked\r\n" in sent
    assert sent.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")


def test_upload_back_pressure_pauses_the_client(trickle):
    h = make(trickle)
    h.send(b"PUT http://origin.test/up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 100\r\n\r\n")
    server, upstream = h.accept()
    assert h.client.producerState == "producing"
    upstream.producer.pauseProducing()
    assert h.client.producerState == "paused"
    upstream.producer.resumeProducing()
    assert h.client.producerState == "producing"


def test_download_back_pressure_pauses_the_destination(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/big HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, upstream = h.accept()
    # A client that stops reading (its transport pauses its producer)
    # stops the destination, until it reads again.
    h.client.producer.pauseProducing()
    assert upstream.producerState == "paused"
    h.client.producer.resumeProducing()
    assert upstream.producerState == "producing"


def test_the_client_transport_keeps_one_producer_that_follows_each_request(trickle):
    """
    The client transport's producer is registered once; its pauses reach
    whatever produces for the connection at the time: the destination
    while a response comes, and between requests the gate that stops
    reading the client.
    """
    h = make(trickle)
    registered: list = []
    register = h.client.registerProducer
    h.client.registerProducer = lambda producer, streaming: (  # type: ignore[method-assign]
        registered.append(producer), register(producer, streaming)
    )
    h.send(b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, upstream = h.accept()
    h.client.producer.pauseProducing()
    assert (upstream.producerState, h.client.producerState) == ("paused", "producing")
    h.client.producer.resumeProducing()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    h.client.producer.pauseProducing()
    assert (upstream.producerState, h.client.producerState) == ("producing", "paused")
    h.client.producer.resumeProducing()
    assert h.client.producerState == "producing"
    h.send(b"GET http://origin.test/b HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    h.client.producer.pauseProducing()
    assert (upstream.producerState, h.client.producerState) == ("paused", "producing")
    h.client.producer.resumeProducing()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
    assert h.client.value().endswith(b"b")
    assert len(registered) == 1


def test_chunked_response_passes_through_to_http11(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, _ = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    status, headers, body = h.response()
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"2\r\nhi\r\n0\r\n\r\n"
    assert not h.client.disconnecting


def test_chunked_response_is_decoded_for_http10_and_closed(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.0\r\nHost: origin.test\r\n\r\n")
    server, upstream = h.accept()
    # The client's connection closes; the destination's is kept for others.
    assert b"Connection:" not in upstream.value()
    h.answer(server, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    status, headers, body = h.response()
    assert "transfer-encoding" not in headers
    assert headers["connection"] == "close"
    assert body == b"hi"
    assert h.client.disconnecting
    assert not upstream.disconnecting


def test_close_delimited_response_ends_with_the_destination(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, _ = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert not h.client.disconnecting
    server.connectionLost(Failure(error.ConnectionDone()))
    assert h.response()[2] == b"all of it"
    assert h.client.disconnecting


def test_interim_100_continue_is_relayed(trickle):
    h = make(trickle)
    h.send(
        b"PUT http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 2\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    server, upstream = h.accept()
    assert b"Expect: 100-continue" in upstream.value()
    h.answer(server, b"HTTP/1.1 100 Continue\r\n\r\n")
    assert h.client.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    h.send(b"ok")
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert h.client.value().endswith(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize(
    "url, header, reason",
    [
        ("http://elsewhere.test/", "blocked-by-allowlist", "not_allowed"),
        ("http://bad.example.com/", "blocked-by-denylist", "denied"),
        ("http://10.1.2.3/", "blocked-by-allowlist", "not_allowed_local"),
        ("http://localhost:8080/", "blocked-by-allowlist", "not_allowed_local"),
        ("http://2130706434/", "blocked-by-allowlist", "not_allowed_local"),
    ],
)
def test_blocked_requests_get_403_json_and_are_never_dialled(trickle, url, header, reason):
    h = make(trickle)
    host = url.split("/")[2]
    h.send(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status, headers, body = h.response()
    assert status == 403
    assert headers["x-proxy-error"] == header
    doc = json.loads(body)
    assert doc["status"] == "blocked"
    assert doc["reason"] == reason
    assert doc["decision"] == "deny"
    assert doc["source"] == "baseline_policy"
    assert doc["protocol"] == "http"
    assert h.dials() == []
    assert h.resolver.lookups == []  # unknown or blocked names are never resolved
    assert [e["network.policy.reason"] for e in h.auditor.events] == [reason]
    # A body-less request keeps the connection usable.
    assert not h.client.disconnecting


def test_inet_aton_spelling_is_judged_as_its_dotted_quad(trickle):
    h = make(trickle)
    h.send(b"GET http://2130706433:8000/ HTTP/1.1\r\nHost: 2130706433:8000\r\n\r\n")
    assert h.dials() == [("127.0.0.1", 8000)]
    assert h.auditor.events[-1]["server.address"] == "127.0.0.1"


def test_block_after_a_completed_exchange_is_answered_not_aborted(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, _ = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.client.clear()
    h.send(b"GET http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
    status, headers, _ = h.response()
    assert (status, headers["x-proxy-error"]) == (403, "blocked-by-allowlist")
    assert not h.client.disconnecting


def test_blocked_request_with_body_closes_the_connection(trickle):
    h = make(trickle)
    h.send(b"POST http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\nContent-Length: 3\r\n\r\nabc")
    status, headers, _ = h.response()
    assert status == 403
    assert headers["connection"] == "close"
    assert h.client.disconnecting


def test_name_resolving_to_any_private_address_is_refused(trickle):
    h = make(trickle)
    h.send(b"GET http://private.example.com/ HTTP/1.1\r\nHost: private.example.com\r\n\r\n")
    status, headers, body = h.response()
    assert status == 403
    assert json.loads(body)["reason"] == "not_allowed_local"
    assert h.dials() == []


def test_dns_failure_is_502(trickle):
    h = make(trickle)
    h.send(b"GET http://nowhere.example.com/ HTTP/1.1\r\nHost: nowhere.example.com\r\n\r\n")
    status, headers, body = h.response()
    assert status == 502
    assert headers["x-proxy-error"] == "upstream-dns-failed"
    assert h.dials() == []
    assert h.auditor.events[-1]["network.policy.reason"] == "upstream_dns_failed"


def test_limited_mode_blocks_writes_and_connect(trickle):
    policy = Policy.build(mode=Mode.LIMITED, allowed=ALLOW)
    h = make(trickle, policy=policy)
    h.send(b"POST http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 0\r\n\r\n")
    status, headers, body = h.response()
    assert status == 403
    assert headers["x-proxy-error"] == "blocked-by-method-policy"
    assert json.loads(body)["source"] == "mode_guard"
    h2 = make(trickle, policy=policy)
    h2.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    status, headers, body = h2.response()
    assert headers["x-proxy-error"] == "blocked-by-mitm-required"
    assert json.loads(body)["protocol"] == "https_connect"
    assert h.dials() == h2.dials() == []


def test_disabled_proxy_answers_503(trickle):
    h = make(trickle, policy=Policy.build(enabled=False, allowed=ALLOW))
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    status, headers, body = h.response()
    assert status == 503
    assert json.loads(body)["reason"] == "proxy_disabled"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        # Absolute-URI and Host disagree (SPEC §4.2a).
        (b"GET http://origin.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n", 400),
        (b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test:8080\r\n\r\n", 400),
        # Smuggling shapes.
        (b"POST http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"GET http://u:p@origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n", 400),
        (b"GET http://origin.test/ HTTP/1.1\nHost: origin.test\n\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        # Malformed Host headers (origin-form takes its target from them).
        (b"GET /x HTTP/1.1\r\nHost: origin.test:8o\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: u@origin.test\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
    ],
)
def test_malformed_requests_are_refused_and_never_forwarded(trickle, request_bytes, status):
    h = make(trickle)
    h.send(request_bytes)
    assert h.response()[0] == status
    assert h.dials() == []
    assert h.client.disconnecting


def test_host_header_with_default_port_matches(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: ORIGIN.test:80\r\n\r\n")
    assert h.dials() == [(PUBLIC, 80)]


def test_origin_form_uses_the_host_header(trickle):
    h = make(trickle)
    h.send(b"GET /x HTTP/1.1\r\nHost: origin.test:8080\r\n\r\n")
    assert h.dials() == [(PUBLIC, 8080)]
    _, upstream = h.accept()
    assert upstream.value().startswith(b"GET /x HTTP/1.1\r\n")


def test_destination_closing_without_response_is_502(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, _ = h.accept()
    server.connectionLost(Failure(error.ConnectionDone()))
    status, headers, _ = h.response()
    assert (status, headers["x-proxy-error"]) == (502, "upstream-bad-response")


def test_malformed_response_is_502(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, upstream = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    status, headers, _ = h.response()
    assert (status, headers["x-proxy-error"]) == (502, "upstream-bad-response")
    assert upstream.disconnecting


def test_connect_dials_first_then_relays_both_ways(trickle):
    h = make(trickle)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\nearly")
    assert h.client.value() == b""  # nothing before the dial succeeds
    assert h.dials() == [(PUBLIC, 443)]
    server, upstream = h.accept()
    assert h.client.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert upstream.value() == b"early"
    h.send(b"hello")
    assert upstream.value() == b"earlyhello"
    h.answer(server, b"world")
    assert h.client.value().endswith(b"world")
    # Each side is the other's producer: a slow reader stops the writer.
    assert h.client.producer is upstream and upstream.producer is h.client
    # Half-close passes through; the tunnel closes when both sides are done.
    h.proto.readConnectionLost()
    assert upstream.halfClosed and not upstream.disconnecting
    server.readConnectionLost()
    assert h.client.disconnecting and upstream.disconnecting


@pytest.mark.parametrize(
    "failure, status, header",
    [
        (error.ConnectionRefusedError(), 502, "upstream-connect-failed"),
        (error.TimeoutError(), 504, "upstream-timeout"),
        (error.NoRouteError(), 502, "upstream-connect-failed"),
    ],
)
def test_connect_dial_failures(trickle, failure, status, header):
    h = make(trickle)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    h.refuse(failure)
    got, headers, body = h.response()
    assert (got, headers["x-proxy-error"]) == (status, header)
    assert json.loads(body)["protocol"] == "https_connect"
    assert h.client.disconnecting


def test_dial_falls_back_to_the_next_address(trickle):
    resolver = StaticResolver({"origin.test": [PUBLIC, "2001:4860::1"]})
    h = make(trickle, resolver=resolver)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    h.refuse(error.ConnectionRefusedError())
    assert h.dials() == [(PUBLIC, 443), ("2001:4860::1", 443)]
    h.accept()
    assert h.client.value().startswith(b"HTTP/1.1 200 ")


def test_idle_tunnel_is_closed():
    h = make(False)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    server, upstream = h.accept()
    h.reactor.pump([15, 15])
    h.send(b"x")
    h.reactor.pump([15, 15, 15])
    assert not h.client.disconnecting  # traffic 45 s ago
    h.reactor.pump([15, 15])
    assert h.client.disconnecting and upstream.disconnecting


@implementer(IHostnameResolver)
class SilentResolver:
    """
    A resolver that never answers.
    """

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        receiver.resolutionBegan(None)


def test_client_leaving_during_resolution_cancels_everything():
    h = make(False, resolver=SilentResolver())
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    h.reactor.advance(60)
    assert h.dials() == []


def test_resolver_timeout_is_a_dns_failure():
    h = make(False, resolver=SilentResolver())
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    h.reactor.advance(11)
    status, headers, _ = h.response()
    assert (status, headers["x-proxy-error"]) == (502, "upstream-dns-failed")


def test_client_leaving_during_dial_stops_the_attempt():
    h = make(False)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    connector = h.reactor.connectors[-1]
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    assert connector.stoppedConnecting


def test_connect_after_plain_request_replaces_the_kept_connection(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, upstream = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    # The kept connection carries no tunnel: it is parked for other requests.
    assert len(h.reactor.tcpClients) == 2
    assert not upstream.disconnecting
    assert len(h.factory.legs) == 1
    tunnel_server, tunnel = h.accept()
    assert h.client.value().endswith(b"HTTP/1.1 200 Connection established\r\n\r\n")
    h.send(b"tls bytes")
    assert tunnel.value() == b"tls bytes"
    assert not h.client.disconnecting


def test_dropping_a_congested_destination_resumes_the_client(trickle):
    h = make(trickle)
    h.send(b"PUT http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 100\r\n\r\n")
    server, upstream = h.accept()
    upstream.producer.pauseProducing()
    assert h.client.producerState == "paused"
    # The destination answers early (say 413) and the exchange ends.
    h.answer(server, b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert h.response()[0] == 413
    assert upstream.disconnecting
    assert h.client.disconnecting  # the unsent body cannot be resynchronised


def test_eof_inside_a_head_closes(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHo")
    h.proto.readConnectionLost()
    assert h.client.disconnecting
    assert h.dials() == []


def test_request_then_eof_still_gets_its_response(trickle):
    h = make(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    h.proto.readConnectionLost()
    server, upstream = h.accept()
    assert b"Connection:" not in upstream.value()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    status, headers, body = h.response()
    assert (status, body, headers["connection"]) == (200, b"ok", "close")
    assert h.client.disconnecting
    assert not upstream.disconnecting


def test_slow_head_gets_408_at_the_header_timeout():
    h = make(False)
    for _ in range(2):
        h.send(b"GET http://origin.test/ HTTP/1.1\r\n")
        h.reactor.advance(14)
    assert h.client.value() == b""
    h.reactor.advance(2)
    status, headers, body = h.response()
    assert status == 408
    assert json.loads(body)["reason"] == "bad_request"
    assert h.client.disconnecting
    assert h.dials() == []


def test_keep_alive_idle_closes_quietly_and_a_new_head_gets_the_header_timeout():
    h = make(False)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, _ = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.reactor.advance(119)
    assert not h.client.disconnecting  # idle, but within keepalive_idle_s
    h.send(b"G")  # a head begins: now the 30 s header timeout applies
    h.reactor.advance(29)
    assert not h.client.disconnecting
    h.reactor.advance(1)
    assert h.client.value().endswith(b"\n") and b"408 Request Timeout" in h.client.value()

    h2 = make(False)
    h2.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server2, _ = h2.accept()
    h2.answer(server2, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h2.client.clear()
    h2.reactor.advance(120)
    assert h2.client.disconnecting
    assert h2.client.value() == b""  # closed quietly, no 408


def test_timers_stop_while_a_request_is_served():
    h = make(False)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    h.accept()
    h.reactor.advance(50)  # past the header timeout, within the tunnel's idle limit
    assert not h.client.disconnecting


def test_bytes_arriving_while_deciding_are_kept_up_to_a_bound():
    h = make(False, resolver=SilentResolver())
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert h.client.producerState == "producing"  # no pause per request
    h.send(b"x" * 1000)
    assert h.client.producerState == "producing"
    h.send(b"x" * (1 << 16))
    assert h.client.producerState == "paused"  # a flood stops being read


class RecordingOriginTLS:
    """
    Stands in for L{codex_proxy.mitm.OriginTLS}: names the host asked for.
    """

    def client_tls(self, host):
        return ("client-tls-for", host)


def test_absolute_https_is_forwarded_over_tls_to_the_origin(trickle):
    h = make(trickle)
    h.factory.origin_tls = RecordingOriginTLS()
    h.send(b"GET https://origin.test/x?y HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert h.dials() == [(PUBLIC, 443)]
    server, upstream = h.accept()
    assert upstream.tls == ("client-tls-for", "origin.test")
    assert upstream.value().startswith(b"GET /x?y HTTP/1.1\r\n")
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.response()[0::2] == (200, b"ok")
    assert h.auditor.events[-1]["network.transport.protocol"] == "https"
    # The TLS connection is not reused for a plain http:// request to port 443.
    h.send(b"GET http://origin.test:443/ HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    assert len(h.dials()) == 2


def test_absolute_https_without_a_trust_store_fails_closed(trickle):
    h = make(trickle)
    h.send(b"GET https://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    status, headers, _ = h.response()
    assert (status, headers["x-proxy-error"]) == (502, "upstream-tls-failed")
    assert h.dials() == []


def test_absolute_https_in_limited_mode_is_method_checked(trickle):
    h = make(trickle, policy=Policy.build(mode=Mode.LIMITED, allowed=ALLOW))
    h.factory.origin_tls = RecordingOriginTLS()
    h.send(b"POST https://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 0\r\n\r\n")
    status, headers, body = h.response()
    assert (status, headers["x-proxy-error"]) == (403, "blocked-by-method-policy")
    assert json.loads(body)["protocol"] == "https"
    assert h.dials() == []


def test_a_response_head_goes_out_with_the_body_bytes_that_came_with_it():
    """
    One write per response head: the head and the body bytes of the same
    read reach the client transport together, not as two writes.
    """
    h = Harness(trickle=False)
    writes: list = []
    real = h.client.write
    h.client.write = lambda data: (writes.append(data), real(data))[1]
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, _ = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\nhello")


def test_keep_alive_requests_schedule_no_timed_call_of_their_own():
    """
    One timer per connection: each request used to schedule (and cancel)
    an idle and a header timeout of its own, and its response timeout on a
    timer of its own. A head that arrives whole needs no header timeout;
    the response timeout and the idle one only move the deadline of the
    connection's pending call, which the first request scheduled.
    """
    h = Harness(trickle=False)
    get = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n"
    h.send(get)
    server, _ = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    scheduled: list = []
    real = h.reactor.callLater
    h.reactor.callLater = lambda *a, **kw: (scheduled.append(a[1]), real(*a, **kw))[1]
    for _ in range(3):
        h.send(get)
        h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.client.value().count(b"HTTP/1.1 200 OK") == 4
    ours = [f for f in scheduled if isinstance(getattr(f, "__self__", None), (HTTPProxyProtocol, ReadingHead, IdleWatch, Timer))]
    assert ours == []
    h.reactor.advance(120)
    assert h.client.disconnecting


def test_a_tunnel_watches_idleness_on_the_connections_one_timer():
    h = make(False)
    # The default: its checks (every quarter) come later than the header
    # timeout the timer was armed with, so the pending call just moves.
    h.proto.factory.tunnel_idle = 3600.0
    scheduled: list = []
    real = h.reactor.callLater
    h.reactor.callLater = lambda *a, **kw: (scheduled.append(a[1]), real(*a, **kw))[1]
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    server, upstream = h.accept()
    h.send(b"hello")
    assert upstream.value() == b"hello"
    ours = [f for f in scheduled if isinstance(getattr(f, "__self__", None), (HTTPProxyProtocol, ReadingHead, IdleWatch, Timer))]
    assert ours == []
    # The idle limit still closes a silent tunnel (1 to 1.25 periods).
    h.reactor.pump([900] * 4)
    assert not h.client.disconnecting
    h.reactor.pump([900])
    assert h.client.disconnecting


def test_the_connection_timer_notes_a_later_deadline_and_replaces_a_sooner_one():
    """
    Twisted moves a pending call sooner by searching every pending call:
    with thousands of connections, each keep-alive request paid for it. A
    later deadline is only noted: the pending call, firing early, moves
    itself on, and what was armed last is what fires, when it is due.
    """
    from twisted.internet.task import Clock

    clock = Clock()
    fired: list = []
    timer = Timer(clock)
    timer.arm(30, lambda: fired.append("header"))
    (first,) = clock.getDelayedCalls()
    timer.arm(120, lambda: fired.append("idle"))
    assert clock.getDelayedCalls() == [first]
    clock.advance(30)
    (moved,) = clock.getDelayedCalls()
    assert fired == [] and moved.getTime() == 120
    timer.arm(15, lambda: fired.append("response"))
    (sooner,) = clock.getDelayedCalls()
    assert not moved.active() and sooner.getTime() == 45
    clock.advance(14.5)
    assert fired == []
    clock.advance(0.5)
    assert fired == ["response"] and clock.getDelayedCalls() == []
    timer.arm(10, lambda: fired.append("again"))
    timer.disarm()
    clock.advance(10)
    assert fired == ["response"] and clock.getDelayedCalls() == []


def test_finished_exchanges_are_freed_without_the_garbage_collector(trickle):
    """
    An exchange and its idle watch let go of each other when it ends: a
    kept-alive request leaves nothing for the collector to find (it used
    to leave about ten objects a request, collected in passes that cost
    the proxy about 3% of its CPU under load).
    """
    import gc

    from codex_proxy._exchange import Exchange

    h = make(trickle)
    h.send(b"GET http://origin.test/warm HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, upstream = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nw")
    h.client.clear()
    enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for path in (b"a", b"b", b"c"):
            h.send(b"GET http://origin.test/" + path + b" HTTP/1.1\r\nHost: origin.test\r\n\r\n")
            h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + path)
            assert h.response()[2] == path
            h.client.clear()
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (Exchange, IdleWatch))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    assert left == []
