"""
Chaining to a parent proxy (SPEC §7): a small recording parent in the test
receives what the real proxy sends it, or nothing when it must go direct.
"""

from __future__ import annotations

import base64
import socket
import threading
from dataclasses import dataclass, field

import pytest


@dataclass
class ParentProxy:
    """
    A threaded recording proxy: answers plain requests itself, and tunnels
    CONNECT to the target (or refuses it with C{refuse_status}).
    """

    refuse_status: int | None = None
    heads: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        data = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    try:
                        piece = conn.recv(65536)
                    except OSError:
                        # The proxy stopped with our connection parked.
                        return
                    if not piece:
                        return
                    data += piece
                head, _, data = data.partition(b"\r\n\r\n")
                with self._lock:
                    self.heads.append(head)
                if head.startswith(b"CONNECT "):
                    self._tunnel(conn, head, data)
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nfrom parent\n")

    def _tunnel(self, conn: socket.socket, head: bytes, early: bytes) -> None:
        if self.refuse_status is not None:
            conn.sendall(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % self.refuse_status)
            return
        host, _, port = head.split()[1].decode().rpartition(":")
        with socket.create_connection((host, int(port)), timeout=30) as out:
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            out.sendall(early)

            def pump(src: socket.socket, dst: socket.socket) -> None:
                try:
                    while piece := src.recv(65536):
                        dst.sendall(piece)
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            up = threading.Thread(target=pump, args=(conn, out), daemon=True)
            up.start()
            pump(out, conn)
            up.join(30)

    def header(self, index: int, name: bytes) -> bytes | None:
        for line in self.heads[index].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


@pytest.fixture
def parent():
    server = ParentProxy()
    yield server
    server.close()


def test_plain_request_goes_to_the_parent_with_credentials(proxy_factory, parent, origin, curl):
    proxy = proxy_factory(env={"HTTP_PROXY": parent.url("alice:s%40cret@")})

    result = curl.run(origin.url("/via"), proxy=proxy.http_url)

    assert (result.status, result.body) == (200, b"from parent\n"), result.stderr
    [head] = parent.heads
    assert head.startswith(f"GET http://127.0.0.1:{origin.port}/via HTTP/1.1\r\n".encode())
    assert parent.header(0, b"Proxy-Authorization") == b"Basic " + base64.b64encode(b"alice:s@cret")
    assert origin.requests == []
    assert "s@cret" not in proxy.output and "s%40cret" not in proxy.output


def test_connect_is_chained_to_the_parent(proxy_factory, parent, tls_origin, tls_files, curl):
    proxy = proxy_factory(env={"HTTPS_PROXY": parent.url()})

    result = curl.run(
        tls_origin.url("/secure", host="localhost"), "--cacert", str(tls_files.cert),
        proxy=proxy.http_url,
    )

    assert (result.returncode, result.status) == (0, 200), result.stderr
    assert result.body == b"hello from origin /secure\n"
    [head] = parent.heads
    assert head.startswith(f"CONNECT localhost:{tls_origin.port} HTTP/1.1\r\n".encode())
    assert [seen.path for seen in tls_origin.requests] == ["/secure"]


def test_parent_refusing_connect_is_502_with_its_status(proxy_factory, curl, tls_origin):
    refusing = ParentProxy(refuse_status=407)
    try:
        proxy = proxy_factory(env={"HTTPS_PROXY": refusing.url()})
        result = curl.run(tls_origin.url("/"), proxy=proxy.http_url)
    finally:
        refusing.close()

    assert result.connect_status == 502
    assert result.headers["x-proxy-error"] == "upstream-connect-failed"
    assert len(refusing.heads) == 1


@pytest.mark.parametrize(
    "network, env",
    [
        ({}, {"NO_PROXY": "127.0.0.0/8"}),
        ({}, {"no_proxy": "localhost,127.0.0.1"}),
        ({"allow_upstream_proxy": False}, {}),
    ],
    ids=["no-proxy-cidr", "no-proxy-list", "not-allowed"],
)
def test_direct_when_no_proxy_matches_or_chaining_is_off(
    proxy_factory, parent, origin, tls_origin, tls_files, curl, network, env
):
    proxy = proxy_factory(
        network, env={"HTTP_PROXY": parent.url(), "HTTPS_PROXY": parent.url(), **env}
    )

    plain = curl.run(origin.url("/direct"), proxy=proxy.http_url)
    tls = curl.run(
        tls_origin.url("/direct"), "--cacert", str(tls_files.cert), proxy=proxy.http_url
    )

    assert (plain.status, plain.body) == (200, b"hello from origin /direct\n")
    assert tls.status == 200, tls.stderr
    assert parent.heads == []


def test_blocked_requests_never_reach_the_parent(proxy_factory, parent, curl):
    proxy = proxy_factory(env={"HTTP_PROXY": parent.url(), "HTTPS_PROXY": parent.url()})

    result = curl.run("http://blocked.invalid/", proxy=proxy.http_url)

    assert (result.status, result.headers["x-proxy-error"]) == (403, "blocked-by-allowlist")
    assert parent.heads == []


def test_socks_parent_is_ignored_with_one_warning(proxy_factory, origin, curl):
    proxy = proxy_factory(env={"ALL_PROXY": "socks5h://user:hidden@127.0.0.1:1"})

    result = curl.run(origin.url("/"), proxy=proxy.http_url)

    assert result.status == 200
    warnings = [line for line in proxy.output.splitlines() if "ignoring ALL_PROXY" in line]
    assert len(warnings) == 1 and "hidden" not in proxy.output


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "ALL_PROXY"])
def test_socks5_connect_is_chained_to_the_parent(proxy_factory, parent, origin, curl, variable):
    """
    SPEC §7: a SOCKS5 CONNECT goes through the HTTPS_PROXY (or ALL_PROXY)
    parent with a CONNECT, as an HTTP CONNECT does.
    """
    proxy = proxy_factory(
        {"enable_socks5": True, "socks_url": "127.0.0.1:0"},
        env={variable: parent.url()},
    )

    result = curl.run(
        origin.url("/socks", host="localhost"), proxy=f"socks5h://{proxy.ports['socks']}"
    )

    assert (result.returncode, result.status) == (0, 200), result.stderr
    assert result.body == b"hello from origin /socks\n"
    [head] = parent.heads
    assert head.startswith(f"CONNECT localhost:{origin.port} HTTP/1.1\r\n".encode())
    assert [seen.path for seen in origin.requests] == ["/socks"]


def test_socks5_connect_honours_no_proxy(proxy_factory, parent, origin, curl):
    proxy = proxy_factory(
        {"enable_socks5": True, "socks_url": "127.0.0.1:0"},
        env={"HTTPS_PROXY": parent.url(), "NO_PROXY": "localhost"},
    )

    result = curl.run(
        origin.url("/direct", host="localhost"), proxy=f"socks5h://{proxy.ports['socks']}"
    )

    assert (result.returncode, result.status) == (0, 200), result.stderr
    assert parent.heads == []
    assert [seen.path for seen in origin.requests] == ["/direct"]
