"""
Cost of HTTPS interception.

Starts real proxies (with C{tests/support/proxyproc.py}, as C{rss_tunnel.py}
does) and measures, in one run:

- CONNECT + client TLS handshake through a limited-mode MITM proxy to a host
  it has not seen (a leaf is minted and a context built) vs. one it has
  (cached context);
- small GETs per second on one kept-alive connection: intercepted (limited
  + MITM) vs. a blind CONNECT tunnel (full mode) to the same TLS origin.

    .venv/bin/python bench/mitm.py [--hosts 40] [--gets 2000]
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path


from bench import proxyproc


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are separate writes: without this, Nagle and delayed
    # ACKs cost 40 ms per response and hide everything else.
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def tls_origin(cert: Path, key: Path) -> http.server.ThreadingHTTPServer:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def handshake_seconds(proxy, target: str, context: ssl.SSLContext, name: str) -> float:
    """
    CONNECT to C{target} and complete a TLS handshake for C{name}.
    """
    started = time.perf_counter()
    sock, _ = proxyproc.open_tunnel(proxy.http_addr, target)
    with context.wrap_socket(sock, server_hostname=name):
        return time.perf_counter() - started


def gets_per_second(proxy, port: int, context: ssl.SSLContext, count: int) -> float:
    host, proxy_port = proxy.http_addr
    conn = http.client.HTTPSConnection(host, proxy_port, context=context, timeout=30)
    conn.set_tunnel("localhost", port)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        started = time.perf_counter()
        for _ in range(count):
            conn.request("GET", "/")
            response = conn.getresponse()
            if response.read() != b"ok":
                raise SystemExit(f"unexpected response {response.status}")
        return count / (time.perf_counter() - started)
    finally:
        conn.close()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def measure(hosts: int = 40, gets: int = 2000) -> dict[str, float]:
    """
    The figures of this benchmark: handshake medians (seconds) for new and
    cached hosts, and GETs/s intercepted vs. through a blind tunnel.
    """
    with tempfile.TemporaryDirectory(prefix="bench-mitm-") as tmp:
        workdir = Path(tmp)
        cert, key = proxyproc.self_signed_localhost(workdir)
        origin = tls_origin(cert, key)
        port = origin.server_address[1]
        # One listener per loopback address: each is a host the proxy has
        # not seen yet. They only need to accept TCP (the dial precedes 200).
        listeners = [socket.create_server((f"127.0.0.{2 + i}", 0)) for i in range(hosts)]
        addresses = [sock.getsockname() for sock in listeners]
        allowed = ["localhost", "127.0.0.1", *[h for h, _ in addresses]]
        mitm = proxyproc.start_proxy(
            {"mode": "limited", "mitm": True, "allowed_domains": allowed},
            workdir / "mitm",
            env={"SSL_CERT_FILE": str(cert)},
        )
        blind = proxyproc.start_proxy({"allowed_domains": allowed}, workdir / "blind")
        try:
            ca = ssl.create_default_context(cafile=str(mitm.codex_home / "proxy" / "ca.pem"))
            first = [handshake_seconds(mitm, f"{h}:{p}", ca, h) for h, p in addresses]
            h, p = addresses[0]
            cached = [handshake_seconds(mitm, f"{h}:{p}", ca, h) for _ in range(hosts)]
            trusted = ssl.create_default_context(cafile=str(cert))
            intercepted = gets_per_second(mitm, port, ca, gets)
            tunnelled = gets_per_second(blind, port, trusted, gets)
        finally:
            mitm.stop()
            blind.stop()
            for sock in listeners:
                sock.close()
            origin.shutdown()
    return {
        "mitm_handshake_new_host_ms": median(first) * 1e3,
        "mitm_handshake_cached_host_ms": median(cached) * 1e3,
        "mitm_gets_per_s": intercepted,
        "blind_tunnel_gets_per_s": tunnelled,
        "mitm_to_blind_ratio": intercepted / tunnelled,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=40)
    parser.add_argument("--gets", type=int, default=2000)
    args = parser.parse_args(argv)
    m = measure(args.hosts, args.gets)
    print(f"CONNECT + TLS handshake, new host:    median {m['mitm_handshake_new_host_ms']:.2f} ms"
          f" ({args.hosts} hosts)")
    print(f"CONNECT + TLS handshake, cached host: median {m['mitm_handshake_cached_host_ms']:.2f} ms")
    print(f"GETs/s intercepted (limited + mitm):  {m['mitm_gets_per_s']:.0f}")
    print(f"GETs/s blind tunnel (full mode):      {m['blind_tunnel_gets_per_s']:.0f}")
    print(f"ratio intercepted / blind:            {m['mitm_to_blind_ratio']:.2f}")


if __name__ == "__main__":
    main()
