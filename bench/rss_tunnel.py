"""
Memory of a CONNECT tunnel under a slow reader.

Starts a real proxy (with the end-to-end layer's C{tests/support/proxyproc.py},
so start-up and synchronisation exist once), streams C{--size-mib} through a
tunnel to a reader that sleeps between small reads, and prints the proxy's
baseline and peak RSS, the growth, the throughput, and the same reader's
throughput without the proxy.

    .venv/bin/python bench/rss_tunnel.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

from bench import proxyproc

MIB = 1 << 20


def through_proxy(size: int, recv_size: int, delay: float) -> "proxyproc.StreamResult":
    """
    Read C{size} bytes through a tunnel of a fresh proxy, sampling its RSS.
    """
    with tempfile.TemporaryDirectory(prefix="rss-tunnel-") as workdir:
        proxy = proxyproc.start_proxy({}, Path(workdir))
        try:
            with proxyproc.StreamingOrigin(size) as origin:
                sock, early = proxyproc.open_tunnel(
                    proxy.http_addr, f"127.0.0.1:{origin.port}"
                )
                with sock:
                    result = proxyproc.read_stream(
                        sock, len(early), recv_size, delay, rss_pid=proxy.pid
                    )
        finally:
            proxy.stop()
    if result.received != size:
        raise SystemExit(f"tunnel delivered {result.received} of {size} bytes")
    return result


def direct(size: int, recv_size: int, delay: float) -> "proxyproc.StreamResult":
    """
    The same reader against the origin with no proxy in between.
    """
    with proxyproc.StreamingOrigin(size) as origin:
        with socket.create_connection(("127.0.0.1", origin.port), timeout=30) as sock:
            result = proxyproc.read_stream(sock, 0, recv_size, delay)
    if result.received != size:
        raise SystemExit(f"origin delivered {result.received} of {size} bytes")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--recv-size", type=int, default=16384)
    parser.add_argument(
        "--delay", type=float, default=0.0002, help="seconds slept after each read"
    )
    args = parser.parse_args(argv)
    size = args.size_mib * MIB

    tunnel = through_proxy(size, args.recv_size, args.delay)
    plain = direct(size, args.recv_size, args.delay)

    print(f"bytes:            {size} ({args.size_mib} MiB), recv {args.recv_size},"
          f" sleep {args.delay}s per read")
    print(f"baseline RSS:     {tunnel.baseline_rss / MIB:.1f} MiB")
    print(f"peak RSS:         {tunnel.peak_rss / MIB:.1f} MiB"
          f" ({len(tunnel.samples)} samples, every 16 MiB)")
    print(f"growth:           {tunnel.growth / MIB:.1f} MiB")
    print(f"through proxy:    {tunnel.mb_per_s:.1f} MB/s")
    print(f"direct:           {plain.mb_per_s:.1f} MB/s")
    print(f"ratio:            {tunnel.mb_per_s / plain.mb_per_s:.2f}")


if __name__ == "__main__":
    main()
