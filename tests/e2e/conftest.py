"""
Fixtures of the end-to-end layer: real proxy processes, loopback HTTP and TLS
origins that record what reached them, and curl / raw-socket clients.

A failing test gets the output of every proxy it started attached to its
report.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest
from support import proxyproc as _proc



_PROXIES_ATTR = "_codex_e2e_proxies"

#: Lines a healthy proxy never logs, whatever the test did to it.
_ERROR_MARKERS = ("Traceback (most recent call last)", "Unhandled Error")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """
    Attach every started proxy's output to a failed test's report.
    """
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proxy in getattr(item, _PROXIES_ATTR, []):
            report.sections.append(
                (f"codexproxy pid {proxy.pid} output", proxy.output)
            )


@pytest.fixture(scope="session", autouse=True)
def _require_tools() -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is required by the end-to-end tests (make sysdeps)")
    if not Path(_proc.twistd_path()).exists():
        pytest.fail(f"no twistd next to {sys.executable}")


@pytest.fixture
def proxyproc() -> Any:
    """
    The shared process helpers module (L{proxyproc}), for tests.
    """
    return _proc


@pytest.fixture
def proxy_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Any]]:
    """
    C{proxy_factory(config, args=(), env=None, open_files=None)} starts a
    proxy (C{config} is TOML text or a network table overriding
    L{proxyproc.DEFAULT_NETWORK}; C{args} extra plugin options; C{env} extra
    environment variables; C{open_files} its soft and hard descriptor
    limits) and
    returns the running L{proxyproc.RunningProxy}; all of them are stopped at
    teardown, which fails the test if one logged a traceback.
    """
    started: list[Any] = []
    setattr(request.node, _PROXIES_ATTR, started)

    def start(
        config: str | Mapping[str, Any] | None = None,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        open_files: tuple[int, int] | None = None,
    ) -> Any:
        workdir = tmp_path_factory.mktemp("proxy")
        proxy = _proc.start_proxy(
            {} if config is None else config, workdir, args=args, env=env, open_files=open_files
        )
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
    for proxy in started:
        if any(marker in proxy.output for marker in _ERROR_MARKERS):
            pytest.fail(f"proxy {proxy.pid} logged an error:\n{proxy.output}")


@pytest.fixture
def proxy(proxy_factory: Callable[..., Any]) -> Any:
    """
    A proxy with the default config: full mode, loopback allowlisted exactly.
    """
    return proxy_factory()


@dataclass
class SeenRequest:
    """
    One request as an origin received it.
    """

    method: str
    path: str
    headers: list[tuple[str, str]]
    body_length: int
    body_sha256: str
    #: The address the request came from: one per connection.
    peer: tuple[str, int]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    """
    Records each request, then answers: C{/bytes/N} sends N pattern bytes,
    C{/echo} echoes the body, C{/sink} answers the body's length and digest
    as JSON, anything else a short greeting naming the path.
    """

    protocol_version = "HTTP/1.1"
    server_version = "e2e-origin"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        self.server.record(
            SeenRequest(
                self.command,
                self.path,
                list(self.headers.items()),
                len(body),
                hashlib.sha256(body).hexdigest(),
                self.client_address[:2],
            )
        )
        if self.path.startswith("/bytes/"):
            self._send(_proc.pattern_bytes(int(self.path.split("/")[2])))
        elif self.path == "/echo":
            self._send(body)
        elif self.path == "/sink":
            digest = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            self._send(json.dumps(digest).encode(), "application/json")
        else:
            self._send(f"hello from origin {self.path}\n".encode())

    def _send(self, payload: bytes, content_type: str = "application/octet-stream"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = do_OPTIONS = do_DELETE = _handle


class OriginServer(http.server.ThreadingHTTPServer):
    """
    A threaded HTTP/1.1 origin on 127.0.0.1:0 that records every request
    before answering it, optionally over TLS.
    """

    daemon_threads = True

    def __init__(
        self, tls: ssl.SSLContext | None = None, address: tuple[str, int] = ("127.0.0.1", 0)
    ) -> None:
        super().__init__(address, _OriginHandler)
        self.tls = tls
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def record(self, seen: SeenRequest) -> None:
        with self._lock:
            self.requests.append(seen)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(30)
        # http.server writes head and body separately: without this, Nagle
        # and the peer's delayed ACK add 40 ms to every kept-alive response.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        with conn:
            super().finish_request(conn, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response is not the origin's failure.
        pass

    def start(self) -> OriginServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(10)


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    """
    The plain HTTP origin.
    """
    server = OriginServer().start()
    yield server
    server.stop()


class UnixOriginServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """
    The same recording origin, listening on a unix socket (SPEC §8).
    """

    daemon_threads = True
    record = OriginServer.record
    handle_error = OriginServer.handle_error
    start = OriginServer.start
    stop = OriginServer.stop

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), _OriginHandler)
        self.path = path
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)


@pytest.fixture
def unix_origin(tmp_path: Path) -> Iterator[UnixOriginServer]:
    """
    A recording HTTP origin on C{origin.sock} in the test's temp dir.
    """
    server = UnixOriginServer(tmp_path / "origin.sock").start()
    yield server
    server.stop()


@dataclass
class TLSFiles:
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """
    A self-signed P-256 certificate for DNS C{localhost} and IP 127.0.0.1,
    usable as C{curl --cacert}.
    """
    cert, key = _proc.self_signed_localhost(tmp_path_factory.mktemp("tls"))
    files = TLSFiles(cert, key)
    return files


@pytest.fixture
def tls_origin(tls_files: TLSFiles) -> Iterator[OriginServer]:
    """
    The same origin behind TLS with the L{tls_files} certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    server = OriginServer(tls=context).start()
    yield server
    server.stop()


@pytest.fixture
def tls_origin_at(tls_files: TLSFiles) -> Iterator[Callable[[tuple[str, int]], OriginServer]]:
    """
    C{tls_origin_at(address)}: a L{tls_origin} on a chosen address (a
    well-known port needs privileges: the test is skipped without them).
    """
    yield from _origins_at(tls_files)


def _origins_at(files: TLSFiles) -> Iterator[Callable[[tuple[str, int]], OriginServer]]:
    """
    Start TLS origins with C{files} on chosen addresses; stop them after.
    """
    started: list[OriginServer] = []

    def start(address: tuple[str, int]) -> OriginServer:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(files.cert, files.key)
        try:
            server = OriginServer(tls=context, address=address)
        except OSError as e:
            pytest.skip(f"cannot listen on {address}: {e}")
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()


#: Names the L{named_tls_files} certificate holds besides localhost; tests
#: pin them to 127.0.0.1 with the proxy's C{--resolve}.
TEST_NAMES = ("api.secret.test", "other.secret.test")


@pytest.fixture(scope="session")
def named_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """
    Like L{tls_files}, for L{TEST_NAMES} too.
    """
    cert, key = _proc.self_signed_localhost(tmp_path_factory.mktemp("tls-named"), TEST_NAMES)
    return TLSFiles(cert, key)


@pytest.fixture
def named_tls_origin_at(named_tls_files: TLSFiles) -> Iterator[Callable[[tuple[str, int]], OriginServer]]:
    """
    Like L{tls_origin_at}, with the L{named_tls_files} certificate.
    """
    yield from _origins_at(named_tls_files)


@pytest.fixture
def named_tls_origins(named_tls_files: TLSFiles) -> Iterator[tuple[OriginServer, OriginServer]]:
    """
    Two recording TLS origins with the L{named_tls_files} certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(named_tls_files.cert, named_tls_files.key)
    servers = (OriginServer(tls=context).start(), OriginServer(tls=context).start())
    yield servers
    for server in servers:
        server.stop()


@dataclass
class CurlResult:
    """
    What curl showed: exit code, final status, CONNECT status (0 when none),
    the last header block, every header block, the body and stderr.
    """

    returncode: int
    status: int
    connect_status: int
    headers: dict[str, str]
    header_blocks: list[tuple[int, dict[str, str]]]
    body: bytes
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)


def _parse_header_blocks(raw: bytes) -> list[tuple[int, dict[str, str]]]:
    blocks: list[tuple[int, dict[str, str]]] = []
    for line in raw.decode("latin-1").splitlines():
        if line.startswith("HTTP/"):
            blocks.append((int(line.split()[1]), {}))
        elif ":" in line and blocks:
            key, _, value = line.partition(":")
            blocks[-1][1][key.strip().lower()] = value.strip()
    return blocks


@dataclass
class Curl:
    """
    Runs curl through a proxy with a proxy-free environment and no curlrc.
    """

    workdir: Path
    _count: int = field(default=0)

    def _base(self, proxy: str | None) -> list[str]:
        args = ["curl", "-q", "-sS", "--max-time", "30", "--noproxy", ""]
        return args + (["-x", proxy] if proxy else [])

    def run(
        self, url: str, *args: str, proxy: str | None, stdin: Any = None
    ) -> CurlResult:
        """
        One URL; C{args} are extra curl options.
        """
        self._count += 1
        body = self.workdir / f"curl{self._count}.body"
        headers = self.workdir / f"curl{self._count}.headers"
        done = subprocess.run(
            [
                *self._base(proxy),
                "-o", str(body),
                "-D", str(headers),
                "-w", "%{http_code} %{http_connect}",
                *args,
                url,
            ],
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            env=_proc.clean_env(),
            timeout=60,
        )
        status, connect = done.stdout.decode().split()
        blocks = _parse_header_blocks(headers.read_bytes() if headers.exists() else b"")
        return CurlResult(
            done.returncode,
            int(status),
            int(connect),
            blocks[-1][1] if blocks else {},
            blocks,
            body.read_bytes() if body.exists() else b"",
            done.stderr.decode(errors="replace"),
        )

    def run_many(
        self, urls: list[str], *args: str, proxy: str | None
    ) -> tuple[list[int], list[bytes], str]:
        """
        Several URLs in one curl (so it may reuse its connection); returns
        the statuses, the bodies and the verbose stderr.
        """
        self._count += 1
        stem = self.workdir / f"curl{self._count}"
        bodies = [stem.with_suffix(f".{i}.body") for i in range(len(urls))]
        command = [*self._base(proxy), "-v", "-w", "%{http_code}\n", *args]
        for url, body in zip(urls, bodies):
            command += ["-o", str(body), url]
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_proc.clean_env(),
            timeout=60,
        )
        statuses = [int(code) for code in done.stdout.decode().split()]
        return (
            statuses,
            [b.read_bytes() if b.exists() else b"" for b in bodies],
            done.stderr.decode(errors="replace"),
        )


@pytest.fixture
def curl(tmp_path: Path) -> Curl:
    return Curl(tmp_path)


@dataclass
class RawResponse:
    """
    A response read off a raw socket.
    """

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_exchange(
    addr: tuple[str, int], request: bytes, timeout: float = 30
) -> RawResponse:
    """
    Send C{request} bytes to C{addr} and read one response (its body by
    Content-Length, or to EOF when there is none).
    """
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.sendall(request)
        head, rest = _proc.read_head(sock)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            wanted = int(headers["content-length"])
            while len(rest) < wanted:
                piece = sock.recv(65536)
                if not piece:
                    break
                rest += piece
        else:
            while piece := sock.recv(65536):
                rest += piece
        return RawResponse(int(lines[0].split()[1]), headers, rest)


@pytest.fixture
def raw() -> Callable[[tuple[str, int], bytes], RawResponse]:
    """
    L{raw_exchange}, for requests curl will not send.
    """
    return raw_exchange


@pytest.fixture
def closed_port() -> int:
    """
    A loopback port that was just bound and released, so nothing listens.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
