"""
The floor: the least an HTTP proxy on Twisted and this interpreter can cost.

A forwarder with no policy, no audit, no limits and no error handling
worth the name, for the benchmark's "floor" row only (never for use): it
answers absolute-form requests by forwarding them in origin-form over one
kept-alive connection per client, and C{CONNECT} with a blind relay. It
relies on what the bench origin sends: responses framed by Content-Length.

    python -m bench.floor PORTS_FILE     (writes {"http": "127.0.0.1:PORT"})
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

from twisted.internet import protocol, reactor
from twisted.internet.interfaces import IReactorTCP


class Origin(protocol.Protocol):
    """
    The connection to the destination; bytes go straight to the client.
    """

    client: "Client"

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.client.originReady(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.fromOrigin(data)

    def connectionLost(self, reason: object = None) -> None:
        self.client.transport.loseConnection()


class Client(protocol.Protocol):
    """
    One client connection: heads are read to the blank line, the target
    rewritten, the rest forwarded as it comes.
    """

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.buffer = b""
        self.origin: Optional[Origin] = None
        self.pending: List[bytes] = []
        self.tunnel = False
        self.remaining = 0
        self.close = False

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel:
            self.origin.transport.write(data)  # type: ignore[union-attr]
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head, self.buffer = self.buffer[:end + 4], self.buffer[end + 4:]
        line, _, rest = head.partition(b"\r\n")
        method, target, version = line.split(b" ")
        if method == b"CONNECT":
            host, _, port = target.rpartition(b":")
            self.tunnel = True
            self.dial(host, int(port), b"HTTP/1.1 200 Connection established\r\n\r\n")
            return
        authority, _, path = target[len(b"http://"):].partition(b"/")
        self.close = b"connection: close" in rest.lower()
        request = b"%s /%s %s\r\n%s" % (method, path, version, rest)
        if self.origin is None:
            host, _, port = authority.partition(b":")
            self.pending.append(request)
            self.dial(host, int(port or b"80"), b"")
        else:
            self.origin.transport.write(request)

    def dial(self, host: bytes, port: int, answer: bytes) -> None:
        self.answer = answer
        factory = protocol.ClientFactory()
        # Quiet, as codex-proxy's own: a noisy factory logs two lines a dial.
        factory.noisy = False
        factory.protocol = Origin
        factory.buildProtocol = self.buildOrigin  # type: ignore[method-assign]
        self.reactor.connectTCP(host.decode(), port, factory)

    def buildOrigin(self, addr: object) -> Origin:
        origin = Origin()
        origin.client = self
        return origin

    def originReady(self, origin: Origin) -> None:
        self.origin = origin
        if self.tunnel:
            self.transport.write(self.answer)
        self.transport.registerProducer(origin.transport, True)
        origin.transport.registerProducer(self.transport, True)
        for request in self.pending:
            origin.transport.write(request)
        self.pending = []

    def fromOrigin(self, data: bytes) -> None:
        self.transport.write(data)
        if self.close and not self.tunnel:
            # Connection: close: one response framed by Content-Length.
            if not self.remaining:
                head, _, body = data.partition(b"\r\n\r\n")
                for header in head.split(b"\r\n"):
                    if header.lower().startswith(b"content-length:"):
                        self.remaining = int(header.split(b":")[1]) - len(body)
                        break
            else:
                self.remaining -= len(data)
            if self.remaining <= 0:
                self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if self.origin is not None:
            self.origin.transport.loseConnection()


def main(ports_file: str, tcp: IReactorTCP = reactor) -> None:  # type: ignore[assignment]
    factory = protocol.Factory()

    def build(addr: object) -> Client:
        client = Client()
        client.reactor = tcp  # type: ignore[attr-defined]
        return client

    factory.buildProtocol = build  # type: ignore[method-assign]
    port = tcp.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")
    with open(ports_file, "w") as out:
        json.dump({"http": f"127.0.0.1:{port.getHost().port}"}, out)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1])
