"""
A client that pipelines denied requests and never reads a reply, against the
real proxy process: the flood, what it observed, and what it must show.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

#: How long the non-reading client floods the proxy in the default suite
#: (C{make soak} floods for 20 s).
FLOOD_SECONDS = 3.0

#: The RSS growth a flood may cause: a full write buffer and its
#: bookkeeping, far below what unbounded replies would hold.
FLOOD_GROWTH_LIMIT = 2 << 20


def denied_get(port: int | None = None) -> bytes:
    """
    A GET to the denied host C{denied.test}, on C{port} if given so that
    the reply names it.
    """
    host = "denied.test" if port is None else f"denied.test:{port}"
    return f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


class NonReadingFlood:
    """
    A client that pipelines denied requests as fast as the proxy takes them
    and never reads a reply, in a thread, until stopped.

    @ivar sent: the bytes the proxy's side has taken so far.
    @ivar stalled: set once a send waited L{STALL} seconds without the
        proxy taking a byte: it stopped reading this client.
    """

    STALL = 1.0

    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small window on our side, so the replies pile up in the proxy,
        # and a fixed send buffer, so the proxy is blocked on our bytes fast.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.sock.settimeout(self.STALL)
        self.sock.connect(addr)
        self.sent = 0
        self.stalled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, name="flood", daemon=True)

    def __enter__(self) -> NonReadingFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()

    def _write(self) -> None:
        burst = denied_get() * 200
        while not self._stop.is_set():
            try:
                self.sent += self.sock.send(burst)
            except TimeoutError:
                self.stalled.set()
            except OSError:
                return


@dataclass
class FloodFigures:
    """
    What L{flood} observed: the proxy's RSS before the flood and its peak
    during it (bytes), the bytes the flooding client got in when the proxy
    stopped reading it and at the end (shown when a check fails), and the
    GETs served meanwhile.
    """

    baseline_rss: int
    peak_rss: int
    taken_at_stall: int
    taken_at_end: int
    served: int

    @property
    def growth(self) -> int:
        return self.peak_rss - self.baseline_rss


def flood(proxy: Any, origin: Any, curl: Any, seconds: float) -> FloodFigures:
    """
    Flood C{proxy} with a L{NonReadingFlood} until the proxy stops reading
    it, then for C{seconds} more while curl GETs from C{origin} through the
    proxy one after another (each must succeed), sampling the proxy's RSS.
    """
    warm = curl.run(origin.url("/warm"), proxy=proxy.http_url)
    assert warm.status == 200
    baseline = peak = proxy.rss_bytes()
    served = 0
    with NonReadingFlood(proxy.http_addr) as client:
        deadline = time.monotonic() + 10
        while not client.stalled.wait(0.05):
            peak = max(peak, proxy.rss_bytes())
            assert time.monotonic() < deadline, (
                f"the proxy kept reading a client that does not read: {client.sent} bytes"
            )
        taken = client.sent
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            path = f"/during/{served}"
            result = curl.run(origin.url(path), proxy=proxy.http_url)
            assert (result.status, result.body) == (200, f"hello from origin {path}\n".encode())
            served += 1
            peak = max(peak, proxy.rss_bytes())
        return FloodFigures(baseline, peak, taken, client.sent, served)


def check_flood(figures: FloodFigures) -> None:
    """
    What a L{flood} must show: other clients were served meanwhile, and the
    proxy, which stopped reading the flooding client (L{flood} waits for
    that), grew its RSS by less than L{FLOOD_GROWTH_LIMIT}: replies the
    client does not read wait in one write buffer, they do not pile up.
    """
    print(figures, f"growth {figures.growth} bytes")
    assert figures.served >= 3, figures
    assert figures.growth < FLOOD_GROWTH_LIMIT, figures
