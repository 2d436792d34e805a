"""
The client-connection layer the listeners share (L{codex_proxy._connection})
and the interfaces between the HTTP listener's parts: each implementer is
checked with C{verifyObject}; each connection ends with one outcome event.
"""

from __future__ import annotations

from typing import List

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass, verifyObject

from codex_proxy._exchange import Exchange, IExchangeOwner
from codex_proxy._legs import Leg
from codex_proxy._httpstates import IHeadOwner
from codex_proxy.connections import ConnectionOutcome
from codex_proxy.errors import UpstreamError
from codex_proxy.model import Reason
from codex_proxy.relay import Relay
from codex_proxy.upstream import ISink
from support.http import HalfCloseTransport, Harness

GET = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n"


def test_the_listener_provides_what_its_parts_call():
    h = Harness(False)
    verifyObject(IExchangeOwner, h.proto)
    verifyObject(IHeadOwner, h.proto)
    for sink in (Exchange, Leg, Relay):
        verifyClass(ISink, sink)


def test_a_refused_connection_reports_its_refusal(trickle):
    h = Harness(trickle)
    h.factory.connections.max_clients = 0
    seen: List[ConnectionOutcome] = []
    h.factory.connections.observers.append(seen.append)
    h.proto = h.factory.buildProtocol(None)
    h.client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5556))
    h.proto.makeConnection(h.client)
    h.send(GET)
    assert h.response()[0] == 503 and h.client.disconnecting
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    [outcome] = seen
    assert (outcome.decision, outcome.reason, outcome.outcome) == ("deny", "too_many_connections", "blocked")


def test_a_tunnel_reports_the_bytes_it_relayed(trickle):
    h = Harness(trickle)
    seen: List[ConnectionOutcome] = []
    h.factory.connections.observers.append(seen.append)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    server, _ = h.accept()
    h.send(b"12345")
    h.answer(server, b"abc")
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    [outcome] = seen
    assert (outcome.decision, outcome.outcome, outcome.bytes_up, outcome.bytes_down) == ("allow", "closed", 5, 3)


def _internal(logged_errors: List[dict]) -> List[str]:
    """
    The internal errors logged, taken out of C{logged_errors}.
    """
    found = [e for e in logged_errors if "internal error" in e.get("log_format", "")]
    for e in found:
        logged_errors.remove(e)
    return [e["log_failure"].getErrorMessage() for e in found]


def test_an_answer_is_handled_once_and_what_handling_raises_is_an_internal_error(logged_errors):
    """
    L{ClientConnection.expect}: the answer goes to the callback, a failure
    to the errback; what either raises is logged as an internal error and
    aborts the connection.
    """
    h = Harness(False)
    answers: list = []
    ok: defer.Deferred[int] = defer.Deferred()
    h.proto.expect(ok, answers.append, answers.append)
    ok.callback(1)
    failed: defer.Deferred[int] = defer.Deferred()
    h.proto.expect(failed, answers.append, lambda f: answers.append(f.getErrorMessage()))
    failed.errback(UpstreamError(Reason.UPSTREAM_TIMEOUT, "slow"))
    assert answers == [1, "slow"] and _internal(logged_errors) == [] and not h.client.aborted
    raising: defer.Deferred[int] = defer.Deferred()
    h.proto.expect(raising, lambda n: 1 // n, answers.append)
    raising.callback(0)
    assert _internal(logged_errors) == ["integer division or modulo by zero"]
    assert h.client.aborted


def test_after_closing_an_answer_is_ignored_but_an_unexpected_failure_is_an_internal_error(logged_errors):
    """
    Once the connection closes, an answer or an expected failure (the
    attempt was cancelled, or failed as attempts do) needs no handling; any
    other failure is a bug, and is logged.
    """
    h = Harness(False)
    h.proto.close()
    handled: list = []
    for outcome in (7, defer.CancelledError(), UpstreamError(Reason.UPSTREAM_TIMEOUT, "slow"), KeyError("bug")):
        d: defer.Deferred[int] = defer.Deferred()
        h.proto.expect(d, handled.append, handled.append)
        if isinstance(outcome, BaseException):
            d.errback(outcome)
        else:
            d.callback(outcome)
    assert handled == []
    assert _internal(logged_errors) == ["'bug'"]
