"""
Graceful shutdown of the real process (issue 9): SIGTERM with 500 open
tunnels stops accepting, closes every tunnel, flushes the audit log and
exits 0 within 5 s.
"""

from __future__ import annotations

import json
import signal
import socket
import time

TUNNELS = 500


def test_sigterm_with_500_tunnels_exits_0_quickly_with_a_complete_audit_log(
    proxy_factory, proxyproc, tmp_path
):
    audit = tmp_path / "audit.jsonl"
    proxy = proxy_factory(args=("--audit-log", str(audit)))
    tunnels = []
    with proxyproc.HoldingOrigin() as origin:
        try:
            for _ in range(TUNNELS):
                sock, _ = proxyproc.open_tunnel(proxy.http_addr, f"127.0.0.1:{origin.port}")
                tunnels.append(sock)
            # Every tunnel carries bytes both ways right up to the signal.
            for sock in tunnels[:: TUNNELS // 10]:
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"
            started = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            status = proxy.process.wait(10)
            elapsed = time.monotonic() - started
            assert status == 0
            assert elapsed < 5.0, elapsed
            # Every tunnel was closed by the proxy: clients read EOF (or a reset).
            for sock in tunnels:
                sock.settimeout(5)
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass
        finally:
            for sock in tunnels:
                sock.close()
    # New connections are refused: nothing listens any more.
    try:
        socket.create_connection(proxy.http_addr, timeout=5).close()
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("the listener still accepts after SIGTERM")
    text = audit.read_text()
    assert text.endswith("}\n")
    events = [json.loads(line) for line in text.splitlines()]
    assert len(events) == TUNNELS
    assert {(e["network.transport.protocol"], e["network.policy.decision"]) for e in events} == {
        ("https_connect", "allow")
    }
