"""
Memory of idle SOCKS5 tunnels.

Starts a real proxy with its SOCKS5 listener (through the end-to-end layer's
C{tests/support/proxyproc.py}, like C{bench/rss_tunnel.py}), opens C{--tunnels}
SOCKS5 CONNECT tunnels (each answered REP 0x00 only once the proxy has
connected to the origin) to a local origin that accepts and holds every
connection, and prints the proxy's RSS growth per open tunnel (the target is
under 8 KiB).

    .venv/bin/python bench/socks_idle.py [--tunnels 1000]
"""

from __future__ import annotations

import argparse
import resource
import socket
import struct
import tempfile
from pathlib import Path

from bench import proxyproc

KIB = 1 << 10


def open_socks_tunnel(socks: tuple[str, int], port: int) -> socket.socket:
    """
    A SOCKS5 CONNECT to 127.0.0.1:C{port}; raises unless REP is 0.
    """
    sock = socket.create_connection(socks, timeout=30)
    sock.sendall(
        b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
        + struct.pack("!H", port)
    )
    reply = b""
    while len(reply) < 12:
        piece = sock.recv(12 - len(reply))
        if not piece:
            raise ConnectionError(f"SOCKS5 connection closed after {reply!r}")
        reply += piece
    if reply[:4] != b"\x05\x00\x05\x00":
        raise ConnectionError(f"SOCKS5 CONNECT refused: {reply!r}")
    return sock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args(argv)
    # Two descriptors per tunnel here (client, origin side) and two in the
    # proxy, which inherits this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.tunnels + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    with tempfile.TemporaryDirectory(prefix="socks-idle-") as workdir:
        proxy = proxyproc.start_proxy(
            {"enable_socks5": True, "socks_url": "127.0.0.1:0"}, Path(workdir)
        )
        tunnels: list[socket.socket] = []
        try:
            with proxyproc.HoldingOrigin() as origin:
                # Warm up code paths and allocator pools, then measure from there.
                for _ in range(args.warmup):
                    open_socks_tunnel(proxy.socks_addr, origin.port).close()
                baseline = proxy.rss_bytes()
                for _ in range(args.tunnels):
                    tunnels.append(open_socks_tunnel(proxy.socks_addr, origin.port))
                after = proxy.rss_bytes()
        finally:
            for sock in tunnels:
                sock.close()
            proxy.stop()

    growth = after - baseline
    print(f"tunnels:          {args.tunnels} idle SOCKS5 CONNECT tunnels (after {args.warmup} warm-up)")
    print(f"baseline RSS:     {baseline / KIB / KIB:.1f} MiB")
    print(f"RSS with tunnels: {after / KIB / KIB:.1f} MiB")
    print(f"growth:           {growth / KIB:.0f} KiB")
    print(f"per tunnel:       {growth / args.tunnels / KIB:.2f} KiB (target < 8 KiB)")


if __name__ == "__main__":
    main()
