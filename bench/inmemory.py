"""
The proxy's own Python per kept-alive request, per CONNECT tunnel and per
GET on a new connection, without sockets. C{keepalive}: one HTTP listener
connection over in-memory transports answers the same GET (forwarded,
decided, audited, its response parsed and relayed) again and again.
C{connect}: a new client connection asks for a CONNECT, is dialled, relays
one exchange each way and closes from both ends. C{close}: a new client
connection sends one GET with C{Connection: close}, which goes out on the
destination connection parked by the round before, is answered, and the
client's connection closes. No syscall, no reactor turn: what is left is our code
and the Twisted calls it makes, the part of C{bench.cpu_per_request}'s
figures that this code base decides.

    .venv/bin/python -m bench.inmemory [--workload keepalive|connect|close] [--tree DIR]
        [--requests N] [--profile FILE]

Prints the best of five runs in microseconds per request (or tunnel).
C{--tree} runs another checkout's C{codex_proxy} (the same harness, so the
figures compare); C{--profile} writes a cProfile of one run instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

REQUEST = (
    b"GET http://127.0.0.1:8080/tiny HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
)
TUNNEL = b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
#: What nginx answers for the bench origin's /tiny (a 100-byte body).
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
    b"Last-Modified: Sun, 06 Dec 2026 11:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6751e5c0-64"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 100
)


def _proxy() -> Tuple[Any, Any, Any]:
    """
    An HTTP listener factory over a memory reactor, with a real auditor
    whose events reach a text log observer, as under twistd; the reactor;
    and the in-memory TCP transport class.
    """
    from twisted.internet.interfaces import ITCPTransport
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from zope.interface import implementer

    from codex_proxy.audit import Auditor
    from codex_proxy.httpproxy import HTTPProxyFactory
    from codex_proxy.policy import Policy
    from codex_proxy.policyservice import PolicyService
    from codex_proxy.testing import StaticResolver
    from codex_proxy.upstream import Upstream

    @implementer(ITCPTransport)
    class Transport(StringTransport):
        bufferSize = 65536

        def setTcpNoDelay(self, enabled: bool) -> None:
            pass

        def loseWriteConnection(self) -> None:
            pass

        def connectionLost(self) -> None:
            # What a socket transport does as it closes (FileDescriptor):
            # its producer goes, so no reference cycle outlives it.
            self.producer = None

    observer: Any = textFileLogObserver(open(os.devnull, "w"))
    try:
        # twistd codexproxy's filter in front of twistd's text observer (a
        # checkout from before it has none).
        from codex_proxy._twistdlog import TextOnly
    except ImportError:
        pass
    else:
        observer = TextOnly(observer)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor = MemoryReactorClock()
    policy = PolicyService(
        Policy.build(allowed=["127.0.0.1", "**.github.com", "pypi.org"], denied=["gist.github.com"]),
        resolver=StaticResolver({}),
        clock=reactor,
        auditor=Auditor(reactor.seconds),
    )
    return HTTPProxyFactory(policy, Upstream(reactor, 10), reactor), reactor, Transport


def _new_connection(
    first: bytes, exchange: Callable[[Any, Any], None], check: Callable[[Any], bool]
) -> Callable[[], None]:
    """
    A round on a new client connection: it sends C{first}, which is dialled;
    C{exchange}(proxy, outbound) then runs what the connection carries, and
    both connections close as socket transports do. C{check} reads the
    client transport afterwards.
    """
    from twisted.internet import error
    from twisted.internet.address import IPv4Address
    from twisted.python.failure import Failure

    factory, reactor, Transport = _proxy()
    done = Failure(error.ConnectionDone())

    def one() -> None:
        proxy = factory.buildProtocol(None)
        client = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        proxy.makeConnection(client)
        proxy.dataReceived(first)
        outbound = reactor.tcpClients.pop()[2].buildProtocol(None)
        server = Transport()
        outbound.makeConnection(server)
        exchange(proxy, outbound)
        server.connectionLost()
        outbound.connectionLost(done)
        client.connectionLost()
        proxy.connectionLost(done)
        reactor.advance(0)
        if not check(client):
            raise SystemExit(f"bench.inmemory: unexpected answer: {client.value()[:200]!r}")

    return one


def _connect() -> Callable[[], None]:
    """
    One CONNECT tunnel from accept to close, carrying one exchange.
    """

    def exchange(proxy: Any, outbound: Any) -> None:
        proxy.dataReceived(b"GET /tiny HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
        outbound.dataReceived(RESPONSE)
        proxy.readConnectionLost()
        outbound.readConnectionLost()

    return _new_connection(
        TUNNEL,
        exchange,
        lambda client: client.value().startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK"),
    )


def _close() -> Callable[[], None]:
    """
    One GET on a new client connection, as C{loadgen}'s close mode sends
    it: sent on the destination connection the round before parked (a
    checkout that parks none dials, and closes, one per round), answered,
    and the client's connection closed.
    """
    from twisted.internet import error
    from twisted.internet.address import IPv4Address
    from twisted.python.failure import Failure

    factory, reactor, Transport = _proxy()
    done = Failure(error.ConnectionDone())
    request = REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    outbound: Any = None

    def one() -> None:
        nonlocal outbound
        proxy = factory.buildProtocol(None)
        client = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        proxy.makeConnection(client)
        proxy.dataReceived(request)
        if reactor.tcpClients:
            if outbound is not None:
                outbound.transport.connectionLost()
                outbound.connectionLost(done)
            outbound = reactor.tcpClients.pop()[2].buildProtocol(None)
            outbound.makeConnection(Transport())
        outbound.dataReceived(RESPONSE)
        client.connectionLost()
        proxy.connectionLost(done)
        reactor.advance(0)
        if not (client.value().startswith(b"HTTP/1.1 200 OK") and client.disconnecting):
            raise SystemExit(f"bench.inmemory: unexpected answer: {client.value()[:200]!r}")

    return one


def _keepalive() -> Callable[[], None]:
    """
    A client connection whose first request was answered (its outbound leg
    is kept alive); returns one keep-alive round trip on it.
    """
    from twisted.internet.address import IPv4Address

    factory, reactor, Transport = _proxy()
    proxy = factory.buildProtocol(None)
    client = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    proxy.makeConnection(client)
    proxy.dataReceived(REQUEST)
    reactor.advance(0)
    outbound = reactor.tcpClients[-1][2].buildProtocol(None)
    server = Transport()
    outbound.makeConnection(server)
    outbound.dataReceived(RESPONSE)
    if not client.value().startswith(b"HTTP/1.1 200 "):
        raise SystemExit(f"bench.inmemory: no 200 for the first request: {client.value()[:200]!r}")

    def one() -> None:
        proxy.dataReceived(REQUEST)
        outbound.dataReceived(RESPONSE)
        client.clear()
        server.clear()

    # A second request on the kept leg: forwarded, answered, both kept open.
    client.clear()
    server.clear()
    proxy.dataReceived(REQUEST)
    outbound.dataReceived(RESPONSE)
    if (
        not server.value().startswith(b"GET /tiny HTTP/1.1\r\n")
        or not client.value().startswith(b"HTTP/1.1 200 ")
        or client.disconnecting
        or server.disconnecting
    ):
        raise SystemExit("bench.inmemory: the second request did not go over the kept connection")
    return one


#: Each workload: what builds its round, what one round is.
_WORKLOADS = {
    "keepalive": (_keepalive, "kept-alive request"),
    "connect": (_connect, "CONNECT tunnel"),
    "close": (_close, "GET on a new connection"),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inmemory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=list(_WORKLOADS), default="keepalive")
    parser.add_argument("--tree", type=Path, default=None, help="run the codex_proxy of checkout DIR")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", type=Path, default=None, help="write a cProfile of one run here")
    args = parser.parse_args(argv)
    if args.tree is not None:
        sys.path.insert(0, str(args.tree.resolve()))
    one = _WORKLOADS[args.workload][0]()
    for _ in range(2000):
        one()
    n = args.requests
    if args.profile is not None:
        import cProfile

        cProfile.runctx("for _ in range(n): one()", {}, {"n": n, "one": one}, str(args.profile))
        return 0
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            one()
        best = min(best, time.perf_counter() - started)
    print(f"{best / n * 1e6:.2f} us per {_WORKLOADS[args.workload][1]} (in memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
