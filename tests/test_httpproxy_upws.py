"""
The HTTP listener's websocket upgrades, unix-socket targets and parent-proxy
chaining over in-memory transports, each wire case whole and byte by byte.
"""

from __future__ import annotations

import base64
import json

import pytest
from twisted.internet import error
from twisted.python.failure import Failure

from codex_proxy.parents import from_environ
from codex_proxy.model import Mode
from codex_proxy.policy import Policy
from codex_proxy.upstream import Upstream
from support.http import ALLOW, PUBLIC, HalfCloseTransport, Harness

UPGRADE = (
    b"GET ws://origin.test/chat HTTP/1.1\r\nHost: origin.test\r\n"
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def with_parents(h, environ):
    h.factory.upstream = Upstream(h.reactor, 10, parents=from_environ(environ))
    return h


# -- websocket upgrades -------------------------------------------------------


def test_websocket_upgrade_becomes_a_tunnel_both_ways(trickle):
    h = Harness(trickle)
    h.send(UPGRADE)
    assert h.dials() == [(PUBLIC, 80)]
    server, upstream = h.accept()
    sent = upstream.value()
    assert sent.startswith(b"GET /chat HTTP/1.1\r\n")
    assert b"Connection: Upgrade\r\n" in sent and b"Upgrade: websocket\r\n" in sent
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" in sent
    h.answer(server, SWITCHED + b"\x81\x02hi")
    raw = h.client.value()
    assert raw.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Upgrade: websocket\r\n" in raw and b"Connection: Upgrade\r\n" in raw
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in raw
    assert raw.endswith(b"\r\n\r\n\x81\x02hi")
    upstream.clear()
    h.send(b"\x81\x82abcd" + b"\x00" * 2)
    assert upstream.value() == b"\x81\x82abcd\x00\x00"
    # Half-close passes through, like any tunnel.
    h.proto.readConnectionLost()
    assert upstream.halfClosed


def test_http_scheme_upgrade_and_pipelined_frames_are_relayed(trickle):
    h = Harness(trickle)
    h.send(UPGRADE.replace(b"ws://", b"http://") + b"early-frame")
    server, upstream = h.accept()
    assert b"early-frame" not in upstream.value()
    h.answer(server, SWITCHED)
    assert upstream.value().endswith(b"\r\n\r\nearly-frame")


def test_refused_upgrade_is_an_ordinary_response(trickle):
    h = Harness(trickle)
    h.send(UPGRADE)
    server, upstream = h.accept()
    h.answer(server, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno")
    assert h.response()[0] == 400 and h.response()[2] == b"no"
    assert not h.client.disconnecting


def test_101_without_a_websocket_request_is_502(trickle):
    h = Harness(trickle)
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nUpgrade: h2c\r\n\r\n")
    server, upstream = h.accept()
    assert b"upgrade" not in upstream.value().lower()
    h.answer(server, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
    status, headers, _ = h.response()
    assert (status, headers["x-proxy-error"]) == (502, "upstream-bad-response")


def test_limited_mode_blocks_the_upgrade(trickle):
    h = Harness(trickle, policy=Policy.build(mode=Mode.LIMITED, allowed=ALLOW))
    h.send(UPGRADE)
    status, headers, body = h.response()
    assert (status, headers["x-proxy-error"]) == (403, "blocked-by-method-policy")
    assert json.loads(body)["reason"] == "method_not_allowed"
    assert h.dials() == []


# -- unix sockets -------------------------------------------------------------


def unix_policy(tmp_path, **kw):
    return Policy.build(allowed=["allowed.test"], unix_sockets=[str(tmp_path / "ok.sock")], **kw)


def test_allowed_unix_socket_ignores_the_domain_lists(trickle, tmp_path):
    h = Harness(trickle, policy=unix_policy(tmp_path, denied=["local"]))
    (tmp_path / "link.sock").symlink_to(tmp_path / "ok.sock")
    h.send(
        b"GET http://local/v1/info HTTP/1.1\r\nHost: local\r\nX-Unix-Socket: "
        + str(tmp_path / "link.sock").encode()
        + b"\r\n\r\n"
    )
    [(path, factory, *_)] = h.reactor.unixClients
    assert path == str(tmp_path / "ok.sock")
    assert h.reactor.tcpClients == [] and h.resolver.lookups == []
    server = factory.buildProtocol(None)
    upstream = HalfCloseTransport()
    server.makeConnection(upstream)
    sent = upstream.value()
    assert sent.startswith(b"GET /v1/info HTTP/1.1\r\n")
    assert b"Host: local\r\n" in sent and b"x-unix-socket" not in sent.lower()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.response()[0] == 200 and h.response()[2] == b"ok"
    [event] = h.auditor.events
    assert event["server.address"] == "unix-socket" and event["server.port"] == 0
    assert event["network.policy.scope"] == "non_domain"
    assert event["network.policy.decision"] == "allow"


@pytest.mark.parametrize("path", ["/elsewhere.sock", "ok.sock", ""])
def test_unix_socket_not_allowed_is_403(trickle, tmp_path, path):
    h = Harness(trickle, policy=unix_policy(tmp_path))
    h.send(b"GET http://allowed.test/ HTTP/1.1\r\nx-unix-socket: " + path.encode() + b"\r\n\r\n")
    status, headers, body = h.response()
    assert (status, headers["x-proxy-error"]) == (403, "blocked-by-allowlist")
    assert json.loads(body)["host"] == "unix-socket"
    assert h.reactor.unixClients == [] and h.reactor.tcpClients == []
    assert h.auditor.events[-1]["network.policy.scope"] == "non_domain"


def test_dangerous_flag_allows_any_socket_and_limited_mode_still_applies(trickle, tmp_path):
    h = Harness(trickle, policy=unix_policy(tmp_path, all_unix_sockets=True, mode=Mode.LIMITED))
    h.send(b"POST http://x/ HTTP/1.1\r\nx-unix-socket: /run/any.sock\r\nContent-Length: 0\r\n\r\n")
    assert h.response()[1]["x-proxy-error"] == "blocked-by-method-policy"
    h = Harness(trickle, policy=unix_policy(tmp_path, all_unix_sockets=True, mode=Mode.LIMITED))
    h.send(b"GET http://x/ HTTP/1.1\r\nx-unix-socket: /run/any.sock\r\n\r\n")
    assert [c[0] for c in h.reactor.unixClients] == ["/run/any.sock"]


def test_unix_socket_that_refuses_is_502(trickle, tmp_path):
    h = Harness(trickle, policy=unix_policy(tmp_path))
    h.send(b"GET http://x/ HTTP/1.1\r\nx-unix-socket: " + str(tmp_path / "ok.sock").encode() + b"\r\n\r\n")
    h.reactor.unixClients[0][1].clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    assert h.response()[1]["x-proxy-error"] == "upstream-connect-failed"


# -- parent proxies -----------------------------------------------------------

PARENT_ENV = {
    "HTTP_PROXY": "http://alice:s3cret@127.0.0.9:3128",
    "HTTPS_PROXY": "http://127.0.0.9:3129",
    "NO_PROXY": "direct.example.com",
}


def test_plain_request_goes_to_the_parent_in_absolute_form(trickle):
    h = with_parents(Harness(trickle), PARENT_ENV)
    h.send(
        b"GET http://origin.test/p?q HTTP/1.1\r\nHost: origin.test\r\n"
        b"Proxy-Authorization: Basic Y2xpZW50OnNlY3JldA==\r\n\r\n"
    )
    assert h.dials() == [("127.0.0.9", 3128)]
    server, upstream = h.accept()
    sent = upstream.value()
    assert sent.startswith(b"GET http://origin.test/p?q HTTP/1.1\r\n")
    token = base64.b64encode(b"alice:s3cret")
    assert sent.count(b"Proxy-Authorization") == 1
    assert b"Proxy-Authorization: Basic " + token + b"\r\n" in sent
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    # Keep-alive to the parent serves another target too.
    upstream.clear()
    h.resolver.set("www.example.com", [PUBLIC])
    h.send(b"GET http://www.example.com:8080/ HTTP/1.1\r\nHost: www.example.com:8080\r\n\r\n")
    assert len(h.dials()) == 1
    assert upstream.value().startswith(b"GET http://www.example.com:8080/ HTTP/1.1\r\n")
    # The policy still decided (and resolved) locally first.
    assert h.auditor.events[0]["server.address"] == "origin.test"


def test_no_proxy_and_blocks_never_reach_the_parent(trickle):
    h = with_parents(Harness(trickle), PARENT_ENV)
    h.send(b"GET http://bad.example.com/ HTTP/1.1\r\nHost: bad.example.com\r\n\r\n")
    assert h.response()[0] == 403 and h.dials() == []
    h.resolver.set("direct.example.com", [PUBLIC])
    h.send(b"GET http://direct.example.com/ HTTP/1.1\r\nHost: direct.example.com\r\n\r\n")
    assert h.dials() == [(PUBLIC, 80)]


def test_connect_is_chained_through_the_parent(trickle):
    h = with_parents(Harness(trickle), PARENT_ENV)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\nhello")
    assert h.dials() == [("127.0.0.9", 3129)]
    server, upstream = h.accept()
    assert upstream.value() == b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n"
    assert h.client.value() == b""
    h.answer(server, b"HTTP/1.1 200 Connection established\r\n\r\nfirst")
    assert h.client.value() == b"HTTP/1.1 200 Connection established\r\n\r\nfirst"
    assert upstream.value().endswith(b"\r\n\r\nhello")
    h.answer(server, b"more")
    assert h.client.value().endswith(b"firstmore")


@pytest.mark.parametrize("status", [403, 407, 502])
def test_parent_refusing_connect_is_502_with_its_status(trickle, status):
    h = with_parents(Harness(trickle), PARENT_ENV)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    server, upstream = h.accept()
    h.answer(server, b"HTTP/1.1 %d Nope\r\nContent-Length: 0\r\n\r\n" % status)
    code, headers, body = h.response()
    assert (code, headers["x-proxy-error"]) == (502, "upstream-connect-failed")
    assert json.loads(body)["upstream_status"] == status
    assert upstream.disconnecting or upstream.disconnected


def test_parent_closing_before_answering_connect_is_502(trickle):
    h = with_parents(Harness(trickle), PARENT_ENV)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    server, _ = h.accept()
    server.connectionLost(Failure(error.ConnectionDone()))
    assert h.response()[1]["x-proxy-error"] == "upstream-connect-failed"


def test_client_leaving_during_the_parent_handshake_closes_it():
    h = with_parents(Harness(False), PARENT_ENV)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    server, upstream = h.accept()
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    assert upstream.disconnecting or upstream.disconnected
