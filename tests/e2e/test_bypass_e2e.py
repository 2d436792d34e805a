"""
The bypass corpus against a real C{twistd codexproxy} through HTTP, CONNECT
and SOCKS5, replayed by C{codexproxy selftest}: the proxy runs with the
corpus's allowlist, its address ranges and its C{--resolve} answers
(loopback and private), every
case is refused, and a loopback listener that every request names as its
destination port receives no connection at all. Plus C{--resolve} doing its
positive job where local binding is allowed.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from typing import Iterator, List

import pytest

from codex_proxy.bypass import load_corpus

CORPUS = load_corpus()


class Watch:
    """
    Listening sockets on 127.0.0.1 and ::1 (one port) that never accept:
    every connection made to them stays queued, so after the run a
    non-blocking accept tells whether anything arrived.
    """

    def __init__(self) -> None:
        self.sockets: List[socket.socket] = []
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v4.bind(("127.0.0.1", 0))
        self.port = v4.getsockname()[1]
        self.sockets.append(v4)
        with contextlib.suppress(OSError):
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            try:
                v6.bind(("::1", self.port))
            except OSError:
                v6.close()
                raise
            self.sockets.append(v6)
        for sock in self.sockets:
            sock.listen(128)
            sock.setblocking(False)

    def connections(self) -> int:
        count = 0
        for sock in self.sockets:
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
        return count

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def watch() -> Iterator[Watch]:
    w = Watch()
    yield w
    w.close()


def _selftest(proxyproc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "codex_proxy.cli", "selftest", *args],
        capture_output=True,
        text=True,
        env=proxyproc.clean_env(PYTHONPATH=str(proxyproc._REPO)),
        timeout=120,
    )


def test_selftest_every_case_refused_and_nothing_reaches_loopback(proxy_factory, proxyproc, watch):
    printed = _selftest(proxyproc, "--print-resolve")
    assert printed.returncode == 0, printed.stderr
    proxy = proxy_factory(
        {
            "enable_socks5": True,
            "socks_url": "127.0.0.1:0",
            "allowed_domains": list(CORPUS.allowed_domains),
            "allowed_ranges": list(CORPUS.allowed_ranges),
            "denied_ranges": list(CORPUS.denied_ranges),
        },
        args=tuple(printed.stdout.split()),
    )
    host, port = proxy.socks_addr
    done = _selftest(
        proxyproc,
        "--proxy", proxy.http_url,
        "--socks", f"{host}:{port}",
        "--with-resolve",
        "--port", str(watch.port),
    )
    lines = done.stdout.splitlines()
    live = [case for case in CORPUS.cases if case.live]
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines[-1] == f"{len(live)} passed, 0 failed, {len(CORPUS.cases) - len(live)} skipped"
    ran = [line for line in lines[:-1] if not line.startswith("skip  ")]
    assert len(ran) == len(live) and all(line.startswith("pass  ") for line in ran)
    # Names allowlisted and resolved through --resolve were refused for
    # their answers, not for missing from the allowlist.
    for case in live:
        if case.answers:
            (line,) = [line for line in ran if line.startswith(f"pass  {case.name} (")]
            assert line.count("(not_allowed_local)") == 2, line
            assert "socks5 REP 0x02" in line
    assert watch.connections() == 0


def test_selftest_fails_on_a_proxy_without_the_resolve_answers(proxy_factory, proxyproc, watch):
    proxy = proxy_factory(
        {"allowed_domains": list(CORPUS.allowed_domains)},
    )
    done = _selftest(
        proxyproc, "--proxy", proxy.http_url, "--with-resolve", "--port", str(watch.port)
    )
    assert done.returncode == 1
    assert "FAIL  resolves-loopback (loopback.bypass.test): http 502 upstream-dns-failed" in done.stdout
    assert done.stdout.splitlines()[-1].endswith(" skipped")
    assert watch.connections() == 0


def test_resolve_answers_reach_a_local_origin_when_local_binding_is_allowed(
    proxy_factory, origin, curl
):
    proxy = proxy_factory(
        {"allowed_domains": ["app.bypass.test"], "allow_local_binding": True},
        args=("--resolve", "app.bypass.test=127.0.0.1"),
    )
    result = curl.run(f"http://app.bypass.test:{origin.port}/pinned", proxy=proxy.http_url)
    assert (result.status, result.body) == (200, b"hello from origin /pinned\n")
    assert [seen.path for seen in origin.requests] == ["/pinned"]
    assert "--resolve app.bypass.test=127.0.0.1" in proxy.output
