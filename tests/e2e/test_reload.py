"""
Live reload of a real C{twistd codexproxy} process on SIGHUP (SPEC §2.5):
new decisions follow the edited file, open tunnels keep relaying, a broken
file leaves the previous policy in force, and the process never exits.
"""

from __future__ import annotations

import os
import signal

from support.socksclient import SOCKS, socks_request


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


def test_reload_disables_a_running_proxy_and_enables_it_again(
    proxy_factory, origin, curl, proxyproc
):
    """
    SPEC §2.5: C{enabled = false} on SIGHUP keeps the listeners bound, answers
    HTTP and CONNECT with 503 C{proxy-disabled} and SOCKS5 with REP 0x02, and
    closes an open tunnel; C{enabled = true} again restores service.
    """
    proxy = proxy_factory(SOCKS)
    target = f"127.0.0.1:{origin.port}"
    sock, _ = proxyproc.open_tunnel(proxy.http_addr, target)

    proxy.config_path.write_text(proxyproc.render_config({**SOCKS, "enabled": False}))
    os.kill(proxy.pid, signal.SIGHUP)
    assert "enabled true -> false" in proxy.wait_for_line("policy reloaded")

    with sock:
        assert sock.recv(1) == b""  # the open tunnel was closed
    for args in ((), ("-p",)):
        refused = curl.run(origin.url("/off"), *args, proxy=proxy.http_url)
        status = refused.connect_status if args else refused.status
        assert status == 503, refused.stderr
        assert refused.headers["x-proxy-error"] == "proxy-disabled"
    control, rep, _ = socks_request(proxy.socks_addr, 1, "127.0.0.1", origin.port)
    control.close()
    assert rep == 0x02
    assert origin.requests == []

    proxy.config_path.write_text(proxyproc.render_config(SOCKS))
    os.kill(proxy.pid, signal.SIGHUP)
    assert "enabled false -> true" in proxy.wait_for_line("policy reloaded", nth=2)

    assert curl.run(origin.url("/on"), proxy=proxy.http_url).status == 200
    assert curl.run(origin.url("/tunnel"), "-p", proxy=proxy.http_url).status == 200
    control, rep, _ = socks_request(proxy.socks_addr, 1, "127.0.0.1", origin.port)
    control.close()
    assert rep == 0x00
    assert [seen.path for seen in origin.requests] == ["/on", "/tunnel"]
    assert proxy.process.poll() is None
