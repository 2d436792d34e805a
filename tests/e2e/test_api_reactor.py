"""
The embedding API on the real reactor (SPEC §9.1): run and shutdown leave no
listening socket or connection behind, shutdown cancels pending decisions,
and the policy service learns the addresses the proxy listens on.
"""

from __future__ import annotations

from typing import Any, List

import pytest_twisted
from twisted.internet import defer, endpoints, protocol

from codex_proxy.api import NetworkProxy
from codex_proxy.config import parse_config

CONFIG = parse_config(
    b'[network]\nenabled = true\nproxy_url = "127.0.0.1:0"\nenable_socks5 = false\n'
    b'allowed_domains = ["127.0.0.1"]\n',
    "c.toml",
)


def _sockets(reactor: Any) -> set:
    return set(reactor.getReaders()) | set(reactor.getWriters())


class _Origin(protocol.Protocol):
    """
    Echoes what it receives: the far end of a tunnel.
    """

    def __init__(self, lost: defer.Deferred) -> None:
        self.lost = lost

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class _Client(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.waiting: List[tuple] = []
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for needle, d in list(self.waiting):
            if needle in self.received:
                self.waiting.remove((needle, d))
                d.callback(self.received)

    def until(self, needle: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((needle, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_run_then_shutdown_leaves_no_socket_behind():
    from twisted.internet import reactor

    origin_lost: defer.Deferred = defer.Deferred()
    origin = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(lambda: _Origin(origin_lost))
    )
    before = _sockets(reactor)
    proxy = yield NetworkProxy.builder().config(CONFIG).http_addr("127.0.0.1:0").build()
    handle = yield proxy.run()
    host, port = handle.http_addr.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert handle.socks_addr is None

    client = yield endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, host, int(port)), _Client()
    )
    target = f"127.0.0.1:{origin.getHost().port}".encode()
    client.transport.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
    yield client.until(b"\r\n\r\n")
    assert client.received.startswith(b"HTTP/1.1 200 ")
    client.transport.write(b"ping")
    yield client.until(b"ping")
    # A listener, the client side, the proxy's two tunnel legs, the origin's.
    assert len(_sockets(reactor) - before) == 5

    yield handle.shutdown()
    yield client.lost
    yield origin_lost
    assert _sockets(reactor) - before == set()
    yield origin.stopListening()


@pytest_twisted.inlineCallbacks
def test_shutdown_cancels_a_pending_decision():
    from twisted.internet import reactor

    pending: List[defer.Deferred] = []
    asked: defer.Deferred = defer.Deferred()

    def decider(request: Any) -> defer.Deferred:
        pending.append(defer.Deferred())
        asked.callback(None)
        return pending[-1]

    before = _sockets(reactor)
    proxy = yield NetworkProxy.builder().config(CONFIG).policy_decider(decider).build()
    handle = yield proxy.run()
    host, port = handle.http_addr.rsplit(":", 1)
    client = yield endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, host, int(port)), _Client()
    )
    client.transport.write(b"GET http://elsewhere.test/ HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
    yield asked
    yield handle.shutdown()
    yield client.lost
    assert pending[0].called  # cancelled with the connection
    pending[0].addErrback(lambda f: f.trap(defer.CancelledError))
    assert client.received == b""
    assert _sockets(reactor) - before == set()


@pytest_twisted.inlineCallbacks
def test_the_policy_service_knows_every_bound_listener():
    """
    The bound addresses, not the configured port 0, so that a request to the
    proxy itself can be refused (issue 15, item 3).
    """
    config = parse_config(
        b'[network]\nenabled = true\nproxy_url = "127.0.0.1:0"\nsocks_url = "127.0.0.1:0"\n',
        "c.toml",
    )
    proxy = yield NetworkProxy.builder().config(config).build()
    handle = yield proxy.run()
    try:
        assert proxy.policy.own_addresses == {
            ("127.0.0.1", int(address.rsplit(":", 1)[1]))
            for address in (handle.http_addr, handle.socks_addr)
        }
        assert all(port > 0 for _, port in proxy.policy.own_addresses)
    finally:
        yield handle.shutdown()
