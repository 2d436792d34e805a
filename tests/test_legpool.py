"""
Destination connections parked between client connections: a GET on a new
client connection goes out on the connection the one before left, as Squid
reuses its server connections, without a dial, still decided and audited;
only body-less requests take one, a parked connection idles out, closes
when its destination speaks or closes, and never serves another client
identity.
"""

from __future__ import annotations

import base64

import pytest

from twisted.internet import error
from twisted.python.failure import Failure

from codex_proxy.config import parse_config
from codex_proxy.policy import policy_from_config
from codex_proxy.testing import StaticResolver
from support.http import PUBLIC, Harness

GET = b"GET http://origin.test/p HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _served(h: Harness, request: bytes = GET) -> tuple:
    """
    Send C{request} on a new client connection, answer it on a new dial,
    and lose the client's connection as a socket transport does (its
    producer is stopped): the destination's server protocol and transport.
    """
    h.reconnect()
    h.send(request)
    server, upstream = h.accept()
    h.answer(server, OK)
    _lose_client(h)
    return server, upstream


def _lose_client(h: Harness) -> None:
    producer = h.client.producer
    h.proto.connectionLost(Failure(error.ConnectionDone()))
    if producer is not None:
        producer.stopProducing()


def test_a_get_on_a_new_connection_goes_out_on_the_parked_one(trickle):
    h = Harness(trickle)
    server, upstream = _served(h)
    # The client's close is not the destination's: nothing asked it to close.
    assert b"connection:" not in upstream.value().lower()
    assert not upstream.disconnecting
    upstream.clear()
    h.reconnect()
    h.send(GET)
    assert len(h.reactor.tcpClients) == 1
    assert upstream.value().startswith(b"GET /p HTTP/1.1\r\nHost: origin.test\r\n")
    h.answer(server, OK)
    status, headers, body = h.response()
    assert (status, body, headers["connection"]) == (200, b"ok", "close")
    assert h.client.disconnecting
    # Decided and audited like the first.
    allowed = [e for e in h.auditor.events if e["network.policy.decision"] == "allow"]
    assert len(allowed) == 2


def test_a_parked_connection_idles_out():
    h = Harness(False)
    server, upstream = _served(h)
    h.reactor.advance(3.9)
    assert not upstream.disconnecting
    h.reactor.advance(0.2)
    assert upstream.disconnecting
    h.reconnect()
    h.send(GET)
    assert len(h.reactor.tcpClients) == 2


@pytest.mark.parametrize("event", ["closes", "speaks"])
def test_a_parked_connection_whose_destination_closes_or_speaks_is_not_used(trickle, event):
    h = Harness(trickle)
    server, upstream = _served(h)
    assert not upstream.disconnecting
    if event == "closes":
        server.connectionLost(Failure(error.ConnectionDone()))
    else:
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert upstream.disconnecting
    h.reconnect()
    h.send(GET)
    assert len(h.reactor.tcpClients) == 2
    assert upstream.value().count(b"GET ") == 1


def test_a_request_with_a_body_dials_rather_than_take_a_parked_connection(trickle):
    h = Harness(trickle)
    server, upstream = _served(h)
    upstream.clear()
    h.reconnect()
    h.send(b"POST http://origin.test/p HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 2\r\n\r\nhi")
    assert len(h.reactor.tcpClients) == 2
    assert upstream.value() == b""
    assert not upstream.disconnecting


def test_a_parked_connection_closed_before_answering_is_retried_on_a_new_dial(trickle):
    h = Harness(trickle)
    server, upstream = _served(h)
    h.reconnect()
    h.send(GET)
    assert len(h.reactor.tcpClients) == 1
    # The destination closed it as the request went out.
    server.connectionLost(Failure(error.ConnectionDone()))
    assert len(h.reactor.tcpClients) == 2
    fresh, _ = h.accept()
    h.answer(fresh, OK)
    assert h.response()[0] == 200


def test_a_connection_goes_to_other_clients_only_once_parked(trickle):
    h = Harness(trickle)
    h.send(GET.replace(b"Connection: close\r\n", b""))
    server, upstream = h.accept()
    h.answer(server, OK)
    first = h.proto, h.client
    # The first client keeps its connection alive, and so its leg.
    h.reconnect()
    h.send(GET)
    assert len(h.reactor.tcpClients) == 2
    # Once it closes, its leg is parked for the next.
    h.proto, h.client = first
    _lose_client(h)
    assert not upstream.disconnecting
    h.reconnect()
    upstream.clear()
    h.send(GET)
    assert upstream.value().startswith(b"GET /p HTTP/1.1\r\n")


def test_parked_connections_are_bounded_per_destination():
    h = Harness(False)
    clients = []
    for _ in range(17):
        h.reconnect()
        h.send(GET)
        clients.append((h.proto, h.client, h.accept()))
    for proto, client, (server, _) in clients:
        h.proto, h.client = proto, client
        h.answer(server, OK)
        _lose_client(h)
    upstreams = [upstream for _, _, (_, upstream) in clients]
    assert [u.disconnecting for u in upstreams] == [False] * 16 + [True]
    assert len(h.factory.legs) == 16


def test_stopping_the_listener_closes_parked_connections():
    h = Harness(False)
    server, upstream = _served(h)
    h.factory.doStart()
    h.factory.doStop()
    assert upstream.disconnecting
    assert len(h.factory.legs) == 0


TOKEN_A = "alpha-token-0123456789"
TOKEN_B = "bravo-token-0123456789"
CLIENTS = f"""
[network]
enabled = true
proxy_url = "127.0.0.1:3128"
allowed_domains = ["origin.test"]

[network.clients.agent-a]
token = "{TOKEN_A}"

[network.clients.agent-b]
token = "{TOKEN_B}"
"""


def _as(name: str, token: str) -> bytes:
    auth = b"Proxy-Authorization: Basic " + base64.b64encode(f"{name}:{token}".encode()) + b"\r\n"
    return GET.replace(b"\r\n\r\n", b"\r\n" + auth + b"\r\n")


def test_a_parked_connection_serves_only_the_client_identity_it_was_dialled_for(trickle):
    policy = policy_from_config(parse_config(CLIENTS.encode(), "c.toml"), lambda p: p)
    h = Harness(trickle, policy=policy, resolver=StaticResolver({"origin.test": [PUBLIC]}))
    server, upstream = _served(h, _as("agent-a", TOKEN_A))
    h.reconnect()
    h.send(_as("agent-b", TOKEN_B))
    assert len(h.reactor.tcpClients) == 2
    upstream.clear()
    h.reconnect()
    h.send(_as("agent-a", TOKEN_A))
    assert len(h.reactor.tcpClients) == 2
    assert upstream.value().startswith(b"GET /p HTTP/1.1\r\n")
