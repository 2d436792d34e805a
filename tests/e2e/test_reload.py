"""
Live reload of a real C{twistd codexproxy} process on SIGHUP (SPEC §2.5):
new decisions follow the edited file, open tunnels keep relaying, a broken
file leaves the previous policy in force, and the process never exits.
"""

from __future__ import annotations

import os
import signal


def _tunnel_get(sock, rest: bytes, host: str, path: str) -> bytes:
    """
    One HTTP/1.1 request through an open tunnel; returns the body.
    """
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = rest
    while piece := sock.recv(65536):
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body


def test_sighup_denies_new_requests_while_an_open_tunnel_keeps_relaying(
    proxy_factory, origin, curl, proxyproc
):
    proxy = proxy_factory()
    assert curl.run(origin.url("/before"), proxy=proxy.http_url).status == 200
    target = f"127.0.0.1:{origin.port}"
    sock, rest = proxyproc.open_tunnel(proxy.http_addr, target)

    proxy.config_path.write_text(proxyproc.render_config({"denied_domains": ["127.0.0.1"]}))
    os.kill(proxy.pid, signal.SIGHUP)
    line = proxy.wait_for_line("policy reloaded")

    assert "denied_domains +127.0.0.1" in line
    assert "allowed_domains -127.0.0.1" in line
    blocked = curl.run(origin.url("/after"), proxy=proxy.http_url)
    assert blocked.status == 403
    assert blocked.headers["x-proxy-error"] == "blocked-by-denylist"
    assert blocked.json()["reason"] == "denied"
    with sock:
        body = _tunnel_get(sock, rest, target, "/bytes/100000")
    assert body == proxyproc.pattern_bytes(100000)
    assert [seen.path for seen in origin.requests] == ["/before", "/bytes/100000"]
    assert proxy.process.poll() is None


def test_broken_file_keeps_the_previous_policy_until_fixed(proxy_factory, origin, curl, proxyproc):
    proxy = proxy_factory()

    proxy.config_path.write_text('[network]\nenabled = true\nmode = "fast"\n')
    os.kill(proxy.pid, signal.SIGHUP)
    line = proxy.wait_for_line("policy reload failed")

    assert "previous policy kept" in line
    assert f"{proxy.config_path}: network.mode: unknown value 'fast'" in line
    assert curl.run(origin.url("/still"), proxy=proxy.http_url).status == 200
    assert proxy.process.poll() is None

    proxy.config_path.write_text(
        proxyproc.render_config({"allowed_domains": ["localhost"], "proxy_url": "127.0.0.1:1"})
    )
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_line("policy reloaded")

    warning = proxy.wait_for_line("cannot change on a running proxy")
    assert "network.proxy_url: changed to 127.0.0.1:1" in warning
    blocked = curl.run(origin.url("/now"), proxy=proxy.http_url)
    assert (blocked.status, blocked.headers["x-proxy-error"]) == (403, "blocked-by-allowlist")
    assert curl.run(origin.url("/named", host="localhost"), proxy=proxy.http_url).status == 200
    assert proxy.process.poll() is None
