"""
The HTTP listener's defects of the redesign and hardening issues, in
memory: configured body limits, late bytes from a dropped destination,
pipelining without recursion, back-pressure on the proxy's own replies,
a reload reaching open intercepted tunnels, proxy loops (C{Via}), and the
one outcome event per client connection.
"""

from __future__ import annotations

import json
from typing import Callable, List, Tuple

from twisted.internet import error
from twisted.python.failure import Failure

from codex_proxy._httpbody import HeadLimits
from codex_proxy.connections import ConnectionOutcome
from codex_proxy.httpproxy import INSTANCE
from codex_proxy.model import Mode
from codex_proxy.policy import Policy
from support.http import HalfCloseTransport, Harness
from support.mitm import World

GET = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
VIA = b"1.1 codex-proxy-" + INSTANCE.encode()


def replies(raw: bytes) -> List[bytes]:
    """
    The proxy's own JSON replies in C{raw}, in order, as their C{host}.
    """
    return [
        json.loads(part.partition(b"\r\n\r\n")[2])["host"].encode()
        for part in raw.split(b"HTTP/1.1 ")[1:]
    ]


def blocked(n: int) -> bytes:
    return b"".join(
        b"GET http://d%d.test/ HTTP/1.1\r\nHost: d%d.test\r\n\r\n" % (i, i) for i in range(n)
    )


# -- issue 14, defect 3: request bodies read with the configured limits -------


def test_chunked_request_trailers_obey_the_configured_limits(trickle):
    h = Harness(trickle, limits=HeadLimits(max_header_fields=3))
    h.send(
        b"POST http://origin.test/up HTTP/1.1\r\nHost: origin.test\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    server, upstream = h.accept()
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(10))
    h.send(b"3\r\nabc\r\n0\r\n" + trailers + b"\r\n")
    status, _, body = h.response()
    assert (status, json.loads(body)["reason"]) == (400, "bad_request")
    assert h.client.disconnecting
    # The destination never got a complete message: no fourth trailer, no end.
    _, _, body = upstream.value().partition(b"\r\n\r\n")
    assert b"X-T3" not in body and not body.endswith(b"\r\n\r\n")
    assert upstream.disconnecting


# -- issue 14, defect 1: bytes from a dropped leg reach no client -------------


def test_late_bytes_from_a_dropped_destination_reach_no_client(trickle):
    h = Harness(trickle)
    h.send(GET)
    old, old_transport = h.accept()
    h.answer(old, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert h.response()[0] == 502 and old_transport.disconnecting
    h.client.clear()
    h.send(GET)
    new, _ = h.accept()
    # The dropped connection still delivers a read (TCP's last segment).
    h.answer(old, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
    h.answer(new, OK)
    assert b"EVIL" not in h.client.value()
    assert h.response()[0::2] == (200, b"ok")


def test_late_bytes_from_a_dropped_tls_leg_reach_no_client(tmp_path, trickle):
    w = World(tmp_path, trickle)
    w.connect()
    w.client()
    w.request(b"GET /1 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    answer = w.origin_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 ")
    w.request(b"GET /2 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert len(w.origins) == 2 and w.origin_saw(1).startswith(b"GET /2 ")
    # The first leg reads on until close_notify: its origin still answers.
    w.origin_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL", index=0)
    answer = w.origin_answer(OK, index=1)
    assert b"EVIL" not in answer
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")


# -- issue 15, item 1: pipelining without recursion ------------------------------


def test_a_thousand_pipelined_blocked_requests_get_a_thousand_replies_in_order():
    h = Harness(False)
    h.send(blocked(1000))
    assert replies(h.client.value()) == [b"d%d.test" % i for i in range(1000)]
    assert len(h.auditor.events) == 1000
    assert not h.client.disconnecting


def test_pipelined_requests_then_eof_are_all_answered_then_closed():
    h = Harness(False)
    h.proto.dataReceived(blocked(3))
    h.proto.readConnectionLost()
    assert not h.client.disconnecting
    h.turn()
    raw = h.client.value()
    assert replies(raw) == [b"d0.test", b"d1.test", b"d2.test"]
    assert raw.count(b"Connection: keep-alive") == 2 and raw.count(b"Connection: close") == 1
    assert h.client.disconnecting


def test_a_thousand_pipelined_requests_in_an_intercepted_tunnel_are_answered(tmp_path):
    w = World(tmp_path, False)
    w.connect()
    w.client()
    answer = w.request(b"TRACE /x HTTP/1.1\r\nHost: origin.test\r\n\r\n" * 1000)
    assert answer.count(b"HTTP/1.1 403 ") == 1000
    assert answer.count(b"x-proxy-error: blocked-by-method-policy\r\n") == 1000
    assert not w.downstream.disconnecting
    assert w.origin_saw() == b""


# -- issue 15, item 2: the proxy's own replies count against back-pressure -----


class NonReadingClient(HalfCloseTransport):
    """
    A client that does not read: like a TCP transport, the write buffer
    pauses the registered producer above a high-water mark and resumes it
    once drained (L{read}).
    """

    HIGH_WATER = 1 << 16
    full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.full and self.producer is not None and len(self.value()) > self.HIGH_WATER:
            self.full = True
            self.producer.pauseProducing()

    def read(self) -> bytes:
        data = self.value()
        self.clear()
        if self.full:
            self.full = False
            self.producer.resumeProducing()
        return data


def test_a_non_reading_pipelining_client_stops_the_proxy_reading():
    client = NonReadingClient()
    h = Harness(False, client=client)
    h.send(blocked(5000))
    first = client.read()
    answered = len(replies(first))
    # Replies stopped near the high-water mark, and so did the decisions.
    assert 0 < answered < 1000
    assert client.producerState == "paused"
    assert len(h.auditor.events) == answered
    seen = replies(first)
    while len(seen) < 5000:
        h.turn()
        more = replies(client.read())
        assert more, "the proxy stopped for good"
        seen += more
    assert seen == [b"d%d.test" % i for i in range(5000)]
    assert client.producerState == "producing"


# -- issue 15, item 6: a reload reaches open intercepted tunnels ---------------


def test_reload_vets_the_pinned_addresses_of_an_open_tunnel(tmp_path):
    def policy(local: bool) -> Policy:
        return Policy.build(
            mode=Mode.LIMITED, mitm=True, allowed=["origin.test"], allow_local_binding=local
        )

    w = World(tmp_path, False, policy=policy(True), origin_ip="127.0.0.1")
    assert w.connect().startswith(b"HTTP/1.1 200 ")
    w.client()
    w.request(b"GET /a HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert w.origin_answer(OK).endswith(b"ok")
    w.service.reload(policy(False))
    answer = w.request(b"GET /b HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"x-proxy-error: blocked-by-allowlist\r\n" in answer
    assert b'"reason":"not_allowed_local"' in answer
    assert b"GET /b" not in w.origin_saw()
    assert w.auditor.events[-1]["network.policy.reason"] == "not_allowed_local"


# -- issue 15, item 3: Via and proxy loops ---------------------------------------


def test_forwarded_requests_carry_our_via(trickle):
    h = Harness(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nVia: 1.0 other-proxy\r\n\r\n")
    _, upstream = h.accept()
    sent = upstream.value()
    assert b"Via: 1.0 other-proxy\r\n" in sent
    assert b"Via: " + VIA + b"\r\n" in sent


def test_a_request_carrying_our_via_is_a_loop(trickle):
    h = Harness(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nVia: 1.1 a, " + VIA + b"\r\n\r\n")
    status, headers, body = h.response()
    assert (status, headers["x-proxy-error"]) == (508, "proxy-loop-detected")
    assert json.loads(body)["reason"] == "proxy_loop"
    assert h.dials() == []
    [event] = h.auditor.events
    assert (event["network.policy.decision"], event["network.policy.reason"]) == ("deny", "proxy_loop")


# -- one outcome event per client connection -----------------------------------


def test_each_client_connection_ends_with_one_outcome_event(trickle):
    h = Harness(trickle)
    seen: List[ConnectionOutcome] = []
    h.factory.connections.observers.append(seen.append)
    h.send(b"PUT http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 3\r\n\r\nabc")
    server, _ = h.accept()
    h.answer(server, OK)
    h.send(b"GET http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
    assert seen == []
    h.reactor.advance(7)
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    [outcome] = seen
    assert outcome == ConnectionOutcome(
        listener="http",
        client="127.0.0.1:5555",
        decision="deny",
        reason="not_allowed",
        outcome="blocked",
        bytes_up=3,
        bytes_down=2,
        duration=7.0,
    )


def _watched(trickle: bool) -> Tuple[Harness, Callable[[], ConnectionOutcome]]:
    """
    A harness, and what closes its client connection and returns the one
    outcome event it ended with.
    """
    h = Harness(trickle)
    seen: List[ConnectionOutcome] = []
    h.factory.connections.observers.append(seen.append)

    def closed() -> ConnectionOutcome:
        h.proto.connectionLost(Failure(error.ConnectionDone()))
        [outcome] = seen
        return outcome

    return h, closed


def test_a_failure_after_an_allowed_decision_is_the_connections_outcome(trickle):
    h, closed = _watched(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    h.refuse(error.ConnectionRefusedError())
    assert h.response()[0] == 502
    outcome = closed()
    assert (outcome.decision, outcome.outcome, outcome.reason) == ("allow", "failed", "upstream_refused")


def test_a_block_after_a_failure_is_the_connections_outcome(trickle):
    h, closed = _watched(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    h.refuse(error.ConnectionRefusedError())
    h.send(b"GET http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
    h.turn()
    outcome = closed()
    assert (outcome.decision, outcome.outcome, outcome.reason) == ("deny", "blocked", "not_allowed")


def test_a_malformed_first_request_leaves_no_decision_in_the_outcome(trickle):
    h, closed = _watched(trickle)
    h.send(b"GET http://origin.test/ HTTP/9.9\r\nHost: origin.test\r\n\r\n")
    outcome = closed()
    assert (outcome.decision, outcome.outcome, outcome.reason) == (None, "bad_request", None)
