"""
HTTPS interception in memory: real TLS handshakes on both legs of the HTTP
listener, over string transports that gain a TLS layer on C{startTLS} the
way TCP transports do. Ciphertext from the client is fed whole and one byte
at a time.
"""

from __future__ import annotations


import pytest
from OpenSSL import SSL

from support.mitm import (
    PUBLIC,
    World,
)


def test_get_inside_the_tunnel_reaches_the_origin_and_post_is_refused(tmp_path, trickle):
    w = World(tmp_path, trickle)
    assert w.connect() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert w.reactor.tcpClients[0][:2] == (PUBLIC, 443)
    w.client()
    assert w.client_tls.negotiatedProtocol == b"http/1.1"

    w.request(b"GET /read HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert w.origin_saw().startswith(b"GET /read HTTP/1.1\r\n")
    answer = w.origin_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")

    refused = w.request(b"POST /write HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 1\r\n\r\nx")
    assert refused.startswith(b"HTTP/1.1 403 ")
    assert b"x-proxy-error: blocked-by-method-policy\r\n" in refused
    assert b'"protocol":"https"' in refused
    assert b"/write" not in w.origin_saw()
    events = [(e["network.transport.protocol"], e["http.request.method"], e["network.policy.decision"]) for e in w.auditor.events]
    assert events == [
        ("https_connect", "CONNECT", "allow"),
        ("https", "GET", "allow"),
        ("https", "POST", "deny"),
    ]
    # Resolved once, for the CONNECT; the inner requests reuse the vetted address.
    assert w.resolver.lookups == ["origin.test"]
    assert len(w.reactor.tcpClients) == 1


def test_keep_alive_reuses_the_upstream_tls_leg(tmp_path, trickle):
    w = World(tmp_path, trickle)
    w.connect()
    w.client()
    for path in (b"/a", b"/b"):
        w.request(b"GET " + path + b" HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        assert w.origin_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!").endswith(b"!")
    assert w.origin_saw().count(b"GET ") == 2
    assert len(w.reactor.tcpClients) == 1


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", 421),
        (b"GET / HTTP/1.1\r\nHost: origin.test:8443\r\n\r\n", 421),
        (b"GET https://other.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n", 421),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n", 405),
    ],
    ids=["other-host", "other-port", "absolute-other", "no-host", "nested-connect"],
)
def test_inner_requests_must_target_the_tunnel(tmp_path, trickle, request_bytes, status):
    w = World(tmp_path, trickle)
    w.connect()
    w.client()
    answer = w.request(request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert w.origin_saw() == b""
    assert len(w.reactor.tcpClients) == 1


def test_sni_naming_another_host_fails_the_handshake(tmp_path, trickle):
    w = World(tmp_path, trickle)
    w.connect()
    seen = w.client(sni="other.test")
    assert seen.lost is not None and seen.lost.check(SSL.Error)
    assert w.client_tls.negotiatedProtocol is None


def test_untrusted_origin_certificate_is_502(tmp_path, trickle):
    w = World(tmp_path, trickle, trust_origin=False)
    w.connect()
    w.client()
    answer = w.request(b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"x-proxy-error: upstream-tls-failed\r\n" in answer
    assert w.origin_saw() == b""


@pytest.mark.parametrize("listener", ["http", "socks5"])
def test_a_client_that_half_closes_before_its_intercepted_tunnel_opens_is_closed(tmp_path, listener):
    """
    A client that sent its request and then shut down its sending side can
    never finish a TLS handshake: once the tunnel is dialled, the proxy
    closes the connection (and drops the dialled leg) rather than wait for
    the header timeout. Through SOCKS5 that EOF came to the SOCKS5 protocol
    before the HTTP listener's interception took the connection over.
    """
    from twisted.internet.address import IPv4Address

    from codex_proxy.socks5 import SOCKS5Factory
    from support.mitm import TLSCapableTransport, take
    from support.socks import NO_AUTH, connect

    w = World(tmp_path, False)
    if listener == "http":
        w.proxy.dataReceived(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
        client = w.downstream
        proto = w.proxy
    else:
        socks = SOCKS5Factory(
            w.service, w.proxy.factory.upstream, w.reactor, reactor=w.reactor, https=w.proxy.factory
        )
        proto = socks.buildProtocol(None)
        client = TLSCapableTransport(False, peerAddress=IPv4Address("TCP", "127.0.0.1", 5556))
        client.protocol = proto
        proto.makeConnection(client)
        proto.dataReceived(NO_AUTH + connect("origin.test", 443))
    proto.readConnectionLost()
    assert not client.disconnecting
    w.accept()
    answered = take(client)
    assert answered.startswith(b"HTTP/1.1 200" if listener == "http" else b"\x05\x00")
    assert client.disconnecting
    assert w.upstreams[0].disconnecting
