"""
Bounded load and soak checks against the real process (loopback only).

CI runs the short version; `make soak` sets CODEX_SOAK=1 for the long one
(the figures of the hardening issue: 20,000 connections, 50,000 requests,
a non-reading pipelining client for 20 s instead of
C{FLOOD_SECONDS}).
Synchronisation is by round trips through the proxy, never by sleeping.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any, List

from support.flood import FLOOD_SECONDS, check_flood, flood


LONG = os.environ.get("CODEX_SOAK") == "1"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def get(sock: socket.socket, proxyproc: Any, origin: Any, close: bool = False) -> bytes:
    """
    One absolute-form GET on C{sock}; returns the body.
    """
    conn = "close" if close else "keep-alive"
    sock.sendall(
        f"GET {origin.url('/bytes/16')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        f"Connection: {conn}\r\n\r\n".encode()
    )
    head, rest = proxyproc.read_head(sock)
    assert head.startswith(b"HTTP/1.1 200 "), head
    while len(rest) < 16:
        rest += sock.recv(65536)
    return rest


def test_slow_header_clients_do_not_delay_a_normal_client(proxy, origin, proxyproc):
    slow: List[socket.socket] = []
    try:
        for _ in range(1000):
            s = socket.create_connection(proxy.http_addr, timeout=10)
            s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(s)
        start = time.monotonic()
        with socket.create_connection(proxy.http_addr, timeout=10) as s:
            assert get(s, proxyproc, origin) == proxyproc.pattern_bytes(16)
        assert time.monotonic() - start < 1.0
    finally:
        for s in slow:
            s.close()


def test_descriptors_return_to_their_starting_count(proxy, origin, proxyproc):
    count = 20_000 if LONG else 2_000
    with socket.create_connection(proxy.http_addr, timeout=10) as s:
        get(s, proxyproc, origin)  # warm: the listener and logging are set up
    baseline = open_fds(proxy.pid)
    for _ in range(count):
        with socket.create_connection(proxy.http_addr, timeout=10) as s:
            get(s, proxyproc, origin, close=True)
    # Each round trip lets the reactor run at least once more, so closes the
    # clients made earlier have been processed after a few of them.
    for _ in range(100):
        if open_fds(proxy.pid) <= baseline:
            break
        with socket.create_connection(proxy.http_addr, timeout=10) as s:
            get(s, proxyproc, origin, close=True)
    assert open_fds(proxy.pid) <= baseline


def test_memory_is_flat_over_many_requests(proxy, origin, proxyproc):
    first, last = (10_000, 50_000) if LONG else (2_000, 6_000)
    with socket.create_connection(proxy.http_addr, timeout=10) as s:
        for _ in range(first):
            get(s, proxyproc, origin)
        before = proxyproc.read_rss(proxy.pid)
        for _ in range(last - first):
            get(s, proxyproc, origin)
        after = proxyproc.read_rss(proxy.pid)
    assert after - before < 5 * 1024 * 1024, (before, after)


def test_tunnels_survive_sighup_reloads(proxy, proxyproc):
    tunnels, reloads = (2_000, 20) if LONG else (500, 3)
    open_: List[socket.socket] = []
    with proxyproc.HoldingOrigin() as origin:
        target = f"127.0.0.1:{origin.port}"
        try:
            for _ in range(tunnels):
                open_.append(proxyproc.open_tunnel(proxy.http_addr, target)[0])
            for n in range(1, reloads + 1):
                os.kill(proxy.pid, signal.SIGHUP)
                proxy.wait_for_line("policy reloaded", nth=n)
            for index, sock in enumerate(open_):
                payload = b"%d" % index
                sock.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    piece = sock.recv(64)
                    assert piece, f"tunnel {index} closed by a reload"
                    got += piece
                assert got == payload
            # The reloaded policy still admits new tunnels.
            sock, _ = proxyproc.open_tunnel(proxy.http_addr, target)
            open_.append(sock)
        finally:
            for sock in open_:
                sock.close()


def test_a_non_reading_pipelining_client_does_not_grow_the_proxy(proxy_factory, origin, curl):
    seconds = 20.0 if LONG else FLOOD_SECONDS
    proxy = proxy_factory({"denied_domains": ["denied.test"]})
    check_flood(flood(proxy, origin, curl, seconds))
