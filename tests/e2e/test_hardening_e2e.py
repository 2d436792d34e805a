"""
The second hardening pass (issue 15) against the real C{twistd codexproxy}
process: pipelined blocked requests, the back-pressure of the proxy's own
replies, the proxy dialling itself, the C{Via} loop, and control characters
of a SOCKS5 domain in the text log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest

SOCKS = {"enable_socks5": True, "socks_url": "127.0.0.1:0"}

#: How long the non-reading client floods the proxy in the default suite
#: (the soak version in test_soak.py floods for 20 s).
FLOOD_SECONDS = 3.0

#: The RSS growth a flood may cause: a full write buffer and its
#: bookkeeping, far below what unbounded replies would hold.
FLOOD_GROWTH_LIMIT = 2 << 20


def denied_get(port: int | None = None) -> bytes:
    """
    A GET to the denied host C{denied.test}, on C{port} if given so that
    the reply names it.
    """
    host = "denied.test" if port is None else f"denied.test:{port}"
    return f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


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


class NonReadingFlood:
    """
    A client that pipelines denied requests as fast as the proxy takes them
    and never reads a reply, in a thread, until stopped.

    @ivar sent: the bytes the proxy's side has taken so far.
    @ivar stalled: set once a send waited L{STALL} seconds without the
        proxy taking a byte: it stopped reading this client.
    """

    STALL = 1.0

    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small window on our side, so the replies pile up in the proxy,
        # and a fixed send buffer, so the proxy is blocked on our bytes fast.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.sock.settimeout(self.STALL)
        self.sock.connect(addr)
        self.sent = 0
        self.stalled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, name="flood", daemon=True)

    def __enter__(self) -> NonReadingFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()

    def _write(self) -> None:
        burst = denied_get() * 200
        while not self._stop.is_set():
            try:
                self.sent += self.sock.send(burst)
            except TimeoutError:
                self.stalled.set()
            except OSError:
                return


@dataclass
class FloodFigures:
    """
    What L{flood} observed: the proxy's RSS before the flood and its peak
    during it (bytes), the bytes the flooding client got in when the proxy
    stopped reading it and at the end (shown when a check fails), and the
    GETs served meanwhile.
    """

    baseline_rss: int
    peak_rss: int
    taken_at_stall: int
    taken_at_end: int
    served: int

    @property
    def growth(self) -> int:
        return self.peak_rss - self.baseline_rss


def flood(proxy: Any, origin: Any, curl: Any, seconds: float) -> FloodFigures:
    """
    Flood C{proxy} with a L{NonReadingFlood} until the proxy stops reading
    it, then for C{seconds} more while curl GETs from C{origin} through the
    proxy one after another (each must succeed), sampling the proxy's RSS.
    """
    warm = curl.run(origin.url("/warm"), proxy=proxy.http_url)
    assert warm.status == 200
    baseline = peak = proxy.rss_bytes()
    served = 0
    with NonReadingFlood(proxy.http_addr) as client:
        deadline = time.monotonic() + 10
        while not client.stalled.wait(0.05):
            peak = max(peak, proxy.rss_bytes())
            assert time.monotonic() < deadline, (
                f"the proxy kept reading a client that does not read: {client.sent} bytes"
            )
        taken = client.sent
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            path = f"/during/{served}"
            result = curl.run(origin.url(path), proxy=proxy.http_url)
            assert (result.status, result.body) == (200, f"hello from origin {path}\n".encode())
            served += 1
            peak = max(peak, proxy.rss_bytes())
        return FloodFigures(baseline, peak, taken, client.sent, served)


def test_a_non_reading_pipelining_client_does_not_grow_the_proxy(
    proxy_factory, origin, curl
):
    proxy = proxy_factory({"denied_domains": ["denied.test"]})
    check_flood(flood(proxy, origin, curl, FLOOD_SECONDS))


def check_flood(figures: FloodFigures) -> None:
    """
    What a L{flood} must show: other clients were served meanwhile, and the
    proxy, which stopped reading the flooding client (L{flood} waits for
    that), grew its RSS by less than L{FLOOD_GROWTH_LIMIT}: replies the
    client does not read wait in one write buffer, they do not pile up.
    """
    print(figures, f"growth {figures.growth} bytes")
    assert figures.served >= 3, figures
    assert figures.growth < FLOOD_GROWTH_LIMIT, figures


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
