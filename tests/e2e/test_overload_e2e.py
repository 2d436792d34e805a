"""
limits.max_connections on the real process: the client connections of both
listeners count together; a client beyond the limit gets 503
C{proxy-overloaded} (HTTP) or REP 0x01 (SOCKS5), with an audit line, and
is served again once a connection is freed. The limit fits the process's
descriptor limit: the soft limit is raised as far as it needs, and where the
hard one is too low the limit is lowered so that the 503 is still reached.
"""

from __future__ import annotations

import json
import os
import resource
import socket
from pathlib import Path

import pytest


def test_clients_beyond_max_connections_are_refused_then_served(
    proxy_factory, origin, curl, tmp_path
):
    audit = tmp_path / "audit.jsonl"
    proxy = proxy_factory(
        {"enable_socks5": True, "limits": {"max_connections": 2}},
        args=("--audit-log", str(audit)),
    )
    held = [
        socket.create_connection(proxy.http_addr, timeout=10),
        socket.create_connection(proxy.socks_addr, timeout=10),
    ]
    try:
        # A round trip on each held connection: both are admitted by now.
        held[0].sendall(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (origin.port, origin.port))
        assert held[0].recv(12) == b"HTTP/1.1 200"
        held[1].sendall(b"\x05\x01\x00")
        assert held[1].recv(2) == b"\x05\x00"
        refused = curl.run(origin.url("/over"), proxy=proxy.http_url)
        assert refused.status == 503
        assert refused.headers["x-proxy-error"] == "proxy-overloaded"
        assert refused.json()["reason"] == "too_many_connections"
        with socket.create_connection(proxy.socks_addr, timeout=10) as s:
            s.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + origin.port.to_bytes(2, "big"))
            got = b""
            while len(got) < 12:
                piece = s.recv(64)
                if not piece:
                    break
                got += piece
            assert got[:4] == b"\x05\x00\x05\x01"  # method chosen, then REP 0x01
            assert s.recv(64) == b""  # and closed
        # Half-close both and read to EOF: the proxy closes its side only
        # after it has forgotten the connection, so the count is down.
        for s in held:
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
    finally:
        for s in held:
            s.close()
    # Freed: the next client is served.
    served = curl.run(origin.url("/after"), proxy=proxy.http_url)
    assert served.status == 200
    proxy.stop()
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    refusals = [
        (e["network.transport.protocol"], e["network.policy.source"], e["network.policy.scope"])
        for e in events
        if e["network.policy.reason"] == "too_many_connections"
    ]
    assert refusals == [("http", "proxy_state", "non_domain"), ("socks5_tcp", "proxy_state", "non_domain")]
    assert [s.path for s in origin.requests] == ["/", "/after"]


def test_a_low_descriptor_limit_lowers_max_connections_so_the_503_is_reached(
    proxy_factory, proxyproc, tmp_path
):
    # 256 open files hold (256 - 32) // 2 = 112 client connections with an
    # outbound leg each; the 4096 configured would end in EMFILE, where
    # clients are dropped with no reply and no audit event.
    audit = tmp_path / "audit.jsonl"
    proxy = proxy_factory(
        {"denied_domains": ["denied.test"], "limits": {"max_connections": 4096}},
        args=("--audit-log", str(audit)),
        open_files=(256, 256),
    )
    clients: list[socket.socket] = []
    answers = []
    try:
        # Each client asks once and then stays connected, idle.
        for _ in range(130):
            s = socket.create_connection(proxy.http_addr, timeout=10)
            clients.append(s)
            s.sendall(b"GET http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n")
            head, _ = proxyproc.read_head(s)
            status = head.split(b"\r\n")[0]
            error = [
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"x-proxy-error:")
            ]
            answers.append((status, error))
    finally:
        for s in clients:
            s.close()
    denied = (b"HTTP/1.1 403 Forbidden", [b"blocked-by-denylist"])
    overloaded = (b"HTTP/1.1 503 Service Unavailable", [b"proxy-overloaded"])
    assert answers == [denied] * 112 + [overloaded] * 18
    assert (
        "limits.max_connections = 4096 needs 8224 open files but only 256 are"
        " allowed (hard limit 256); admitting at most 112 client connections"
    ) in proxy.output
    proxy.stop()
    reasons = [
        json.loads(line)["network.policy.reason"] for line in audit.read_text().splitlines()
    ]
    assert reasons == ["denied"] * 112 + ["too_many_connections"] * 18


@pytest.mark.skipif(
    os.geteuid() != 0 and resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 10000,
    reason="needs a hard open-file limit of 10000 for the proxy",
)
def test_the_soft_descriptor_limit_is_raised_as_far_as_max_connections_needs(proxy_factory):
    proxy = proxy_factory({"limits": {"max_connections": 4096}}, open_files=(256, 10000))
    limits = Path(f"/proc/{proxy.pid}/limits").read_text().splitlines()
    assert [line.split()[3:5] for line in limits if line.startswith("Max open files")] == [
        ["8224", "10000"]  # 2 x 4096 + 32
    ]
    assert "admitting at most" not in proxy.output
