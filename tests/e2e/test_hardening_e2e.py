"""
The second hardening pass (issue 15) against the real C{twistd codexproxy}
process: pipelined blocked requests, the proxy dialling itself, the C{Via}
loop, and control characters of a SOCKS5 domain in the text log. The
back-pressure of the proxy's own replies (a non-reading pipelining client)
is checked in test_soak.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from support.flood import denied_get
from support.socksclient import SOCKS


def read_response(reader: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """
    One response from C{reader}: status, lower-cased headers, the body by
    its Content-Length.
    """
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("closed before a response")
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def audit_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_thousand_pipelined_blocked_requests_get_a_thousand_replies_in_order(
    proxy_factory, origin
):
    proxy = proxy_factory({"denied_domains": ["denied.test"]})
    ports = range(1001, 2001)
    with socket.create_connection(proxy.http_addr, timeout=30) as sock:
        reader = sock.makefile("rb")
        sock.sendall(b"".join(denied_get(port) for port in ports))
        replies = []
        for _ in ports:
            status, headers, body = read_response(reader)
            answer = json.loads(body)
            replies.append((status, headers["x-proxy-error"], answer["host"], answer["port"]))
        assert replies == [(403, "blocked-by-denylist", "denied.test", port) for port in ports]
        # The connection still serves the next request.
        sock.sendall(
            f"GET {origin.url('/after')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
        )
        status, _, body = read_response(reader)
        assert (status, body) == (200, b"hello from origin /after\n")


def test_a_thousand_pipelined_blocked_requests_inside_an_intercepted_tunnel(
    proxy_factory, tls_origin, tls_files, proxyproc
):
    proxy = proxy_factory(
        {"mode": "limited", "mitm": True}, env={"SSL_CERT_FILE": str(tls_files.cert)}
    )
    authority = f"localhost:{tls_origin.port}"
    sock, early = proxyproc.open_tunnel(proxy.http_addr, authority)
    assert early == b""
    context = ssl.create_default_context(cafile=str(proxy.codex_home / "proxy" / "ca.pem"))
    with context.wrap_socket(sock, server_hostname="localhost") as tls:
        reader = tls.makefile("rb")
        tls.sendall(f"TRACE / HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() * 1000)
        replies = []
        for _ in range(1000):
            status, headers, body = read_response(reader)
            answer = json.loads(body)
            replies.append((status, headers["x-proxy-error"], answer["reason"], answer["host"]))
        blocked = (403, "blocked-by-method-policy", "method_not_allowed", "localhost")
        assert replies == [blocked] * 1000
        tls.sendall(f"GET /after HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        status, _, body = read_response(reader)
        assert (status, body) == (200, b"hello from origin /after\n")
    assert [(seen.method, seen.path) for seen in tls_origin.requests] == [("GET", "/after")]


def socks_connect(addr: tuple[str, int], address: bytes) -> tuple[socket.socket, int]:
    """
    Greet with no-auth and CONNECT to C{address} (ATYP and all); returns the
    socket and the REP code.
    """
    sock = socket.create_connection(addr, timeout=30)
    sock.sendall(b"\x05\x01\x00\x05\x01\x00" + address)
    reply = b""
    while len(reply) < 6:
        piece = sock.recv(64)
        if not piece:
            break
        reply += piece
    assert reply[:3] == b"\x05\x00\x05", reply  # no-auth chosen, then the reply
    return sock, reply[3]


def client_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


@pytest.mark.parametrize(
    "network",
    [
        {"allowed_domains": ["127.0.0.1"]},
        {"allowed_domains": ["127.0.0.1"], "allow_local_binding": True},
    ],
    ids=["exact-allowlist", "allow-local-binding"],
)
def test_the_proxy_refuses_to_dial_itself_in_one_hop(
    proxy_factory, origin, raw, tmp_path, network
):
    audit = tmp_path / "audit.jsonl"
    proxy = proxy_factory({**SOCKS, **network}, args=("--audit-log", str(audit)))
    http_port, socks_port = proxy.http_addr[1], proxy.socks_addr[1]
    # Loopback is reachable: the refusals below are for the proxy's own ports.
    reachable = raw(
        proxy.http_addr,
        f"GET {origin.url('/')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert reachable.status == 200

    clients = []
    for request in (
        f"GET http://127.0.0.1:{http_port}/ HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\n\r\n",
        f"CONNECT 127.0.0.1:{http_port} HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\n\r\n",
    ):
        with socket.create_connection(proxy.http_addr, timeout=30) as sock:
            sock.sendall(request.encode())
            status, headers, body = read_response(sock.makefile("rb"))
            assert (status, headers["x-proxy-error"]) == (403, "blocked-by-allowlist")
            assert json.loads(body)["reason"] == "not_allowed_local"
            clients.append(client_address(sock))
    own = b"\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", socks_port)
    sock, rep = socks_connect(proxy.socks_addr, own)
    with sock:
        assert rep == 0x02
        clients.append(client_address(sock))
    proxy.stop()

    events = audit_events(audit)
    refusals = [
        (
            e["client.address"],
            e["network.transport.protocol"],
            e["server.port"],
            e["network.policy.reason"],
        )
        for e in events
        if e["network.policy.decision"] == "deny"
    ]
    # One decision per request, each made for our own connection: no hop
    # from the proxy to itself ever reached a listener.
    assert refusals == [
        (clients[0], "http", http_port, "not_allowed_local"),
        (clients[1], "https_connect", http_port, "not_allowed_local"),
        (clients[2], "socks5_tcp", socks_port, "not_allowed_local"),
    ]
    assert len(events) == 4  # and the one allowed GET


def test_a_request_carrying_our_own_via_is_a_loop(proxy_factory, origin, curl, raw, tmp_path):
    audit = tmp_path / "audit.jsonl"
    proxy = proxy_factory({}, args=("--audit-log", str(audit)))
    assert curl.run(origin.url("/first"), proxy=proxy.http_url).status == 200
    via = origin.requests[0].header("Via")
    assert via is not None and via.startswith("1.1 codex-proxy-")

    def get(path: str, via: str) -> Any:
        return raw(
            proxy.http_addr,
            f"GET {origin.url(path)} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
            f"Via: {via}\r\nConnection: close\r\n\r\n".encode(),
        )

    looped = get("/looped", f"1.0 other-proxy, {via}")
    assert (looped.status, looped.headers["x-proxy-error"]) == (508, "proxy-loop-detected")
    # Another proxy's Via is no loop.
    assert get("/elsewhere", "1.1 other-proxy").status == 200
    assert [r.path for r in origin.requests] == ["/first", "/elsewhere"]
    proxy.stop()
    reasons = [e["network.policy.reason"] for e in audit_events(audit)]
    assert reasons == ["allowed", "proxy_loop", "allowed"]


#: A SOCKS5 domain with characters that could forge a log line or drive a
#: terminal: CR, ESC, NUL, U+2028 and U+0085.
CONTROL_DOMAIN = "a\rb\x1b[31mc\x00d\u2028e\u0085f.test".encode()


def test_socks5_domain_control_characters_are_escaped_in_the_log_file(proxyproc, tmp_path):
    daemon = proxyproc.start_daemon(proxyproc.render_config(SOCKS), tmp_path / "daemon")
    try:
        host, _, port = daemon.ports["socks"].rpartition(":")
        address = b"\x03" + bytes([len(CONTROL_DOMAIN)]) + CONTROL_DOMAIN + b"\x00\x50"
        sock, rep = socks_connect((host, int(port)), address)
        with sock:
            assert rep == 0x01
        os.kill(daemon.pid, signal.SIGTERM)
        assert daemon.wait_exit(timeout=10) == 0
    finally:
        daemon.kill()
    log = daemon.log_path.read_bytes()
    for raw_char in (b"\r", b"\x1b", b"\x00", "\u2028".encode(), "\u0085".encode(), b"\x85"):
        assert raw_char not in log
    assert b"(invalid_host) for socks5_tcp a\\x0db\\x1b[31mc\\x00d\\u2028e\\x85f.test:80" in log
