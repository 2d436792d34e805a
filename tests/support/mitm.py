"""
HTTPS interception in memory: transports that gain a TLS layer on
C{startTLS}, and L{World}: a client, the proxy (limited + MITM) and a TLS
origin for C{origin.test}.
"""


from __future__ import annotations

import time
from typing import List, Optional

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import ssl as tssl
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from codex_proxy.ca import load_or_create_ca, mint_leaf
from codex_proxy.httpproxy import HTTPProxyFactory
from codex_proxy.mitm import Interceptor, ServerTLS, UpstreamTrust, server_context
from codex_proxy.model import Mode
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.testing import RecordingAuditor, StaticResolver
from codex_proxy.upstream import Upstream
from support.transports import TCPTransport

PUBLIC = "203.0.114.10"
KEY = ec.generate_private_key(ec.SECP256R1())


@implementer(ITLSTransport)
class TLSCapableTransport(TCPTransport):
    """
    A L{TCPTransport} whose C{startTLS} puts a real TLS layer between it and
    its protocol (as C{twisted.internet._newtls} does for TCP): afterwards
    C{write} is encrypted into C{raw}, and ciphertext goes in through
    C{protocol.dataReceived}.
    """

    def __init__(self, is_client: bool, **kw) -> None:
        super().__init__(**kw)
        self._is_client = is_client
        self.tls: Optional[TLSMemoryBIOProtocol] = None
        self.raw = StringTransport()
        self.protocol: Protocol

    def startTLS(self, creator) -> None:
        factory = TLSMemoryBIOFactory(creator, self._is_client, None)
        # The unbuffered TLS protocol: BufferingTLSTransport flushes on the
        # global reactor, which these tests never run.
        self.tls = TLSMemoryBIOProtocol(factory, self.protocol, False)
        self.protocol = self.tls
        self.tls.makeConnection(self.raw)

    def write(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
        else:
            super().write(data)


class Collector(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost = reason


def tls_endpoint(creator, is_client: bool, wrapped: Protocol):
    """
    A TLS peer in memory: returns its TLS protocol and its raw transport.
    """
    factory = TLSMemoryBIOFactory(creator, is_client, Factory())
    proto = TLSMemoryBIOProtocol(factory, wrapped)
    raw = StringTransport()
    proto.makeConnection(raw)
    return proto, raw


def take(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


class World:
    """
    A client, the proxy (limited + MITM) and a TLS origin for
    C{origin.test}, all in memory.
    """

    def __init__(
        self,
        tmp_path,
        trickle: bool,
        trust_origin: bool = True,
        policy: Optional[Policy] = None,
        origin_ip: str = PUBLIC,
    ) -> None:
        self.trickle = trickle
        self.reactor = MemoryReactorClock()
        self.reactor.advance(time.time())
        self.ca = load_or_create_ca(str(tmp_path / "proxy"), self.reactor.seconds, lambda: KEY)
        # The origin's own CA, which only the proxy's upstream leg trusts.
        self.origin_ca = load_or_create_ca(str(tmp_path / "origin"), self.reactor.seconds)
        origin_cert = mint_leaf(self.origin_ca, "origin.test", KEY.public_key(), self.reactor.seconds())
        self.origin_tls = ServerTLS(server_context(origin_cert, KEY, "origin.test"))
        trust = UpstreamTrust([self.origin_ca.cert] if trust_origin else [])
        self.interceptor = Interceptor(self.ca, trust, self.reactor.seconds, lambda: KEY)
        self.resolver = StaticResolver({"origin.test": [origin_ip]})
        self.auditor = RecordingAuditor(self.reactor.seconds)
        self.service = service = PolicyService(
            policy or Policy.build(mode=Mode.LIMITED, mitm=True, allowed=["origin.test"]),
            resolver=self.resolver,
            clock=self.reactor,
            auditor=self.auditor,
        )
        factory = HTTPProxyFactory(
            service, Upstream(self.reactor, 10), self.reactor, mitm=self.interceptor
        )
        self.proxy = factory.buildProtocol(None)
        self.downstream = TLSCapableTransport(
            False, peerAddress=IPv4Address("TCP", "127.0.0.1", 5555)
        )
        self.downstream.protocol = self.proxy
        self.proxy.makeConnection(self.downstream)
        self.upstreams: List[TLSCapableTransport] = []
        self.closed: set = set()
        self.origins: List[tuple] = []

    def connect(self, target: str = "origin.test:443") -> bytes:
        """
        CONNECT, let the dial succeed; returns the proxy's plaintext answer.
        """
        self.proxy.dataReceived(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        self.accept()
        return take(self.downstream)

    def accept(self) -> None:
        factory = self.reactor.tcpClients[len(self.upstreams)][2]
        out = factory.buildProtocol(None)
        transport = TLSCapableTransport(True)
        transport.protocol = out
        self.upstreams.append(transport)
        seen = Collector()
        origin, origin_raw = tls_endpoint(self.origin_tls, False, seen)
        self.origins.append((origin, origin_raw, seen))
        out.makeConnection(transport)

    def client(self, sni: str = "origin.test") -> Collector:
        creator = tssl.optionsForClientTLS(
            sni, trustRoot=tssl.Certificate.loadPEM(self.ca.pem), acceptableProtocols=[b"http/1.1"]
        )
        self.seen = Collector()
        self.client_tls, self.client_raw = tls_endpoint(creator, True, self.seen)
        self.pump()
        return self.seen

    def pipes(self):
        """
        Each connection as its two TLS protocols and their raw transports.
        """
        yield self.client_tls, self.client_raw, self.downstream.tls, self.downstream.raw
        for upstream, (origin, origin_raw, _) in zip(self.upstreams, self.origins):
            yield upstream.tls, upstream.raw, origin, origin_raw

    def pump(self) -> None:
        closed = self.closed
        while True:
            moved = False
            if len(self.reactor.tcpClients) > len(self.upstreams):
                self.accept()
                moved = True
            # What the reactor runs next (the next pipelined request).
            now = self.reactor.seconds()
            if any(call.getTime() <= now for call in self.reactor.getDelayedCalls()):
                self.reactor.advance(0)
                moved = True
            for a, a_raw, b, b_raw in self.pipes():
                if b is None or id(a_raw) in closed:
                    continue
                data = take(a_raw)
                if data:
                    moved = True
                    # The client's ciphertext may arrive a byte at a time.
                    if self.trickle and a is self.client_tls:
                        for i in range(len(data)):
                            b.dataReceived(data[i : i + 1])
                    else:
                        b.dataReceived(data)
                data = take(b_raw)
                if data:
                    moved = True
                    a.dataReceived(data)
                # A side that closed its raw transport ends it for both.
                if a_raw.disconnecting or b_raw.disconnecting:
                    closed.add(id(a_raw))
                    moved = True
                    a.connectionLost(Failure(ConnectionDone()))
                    b.connectionLost(Failure(ConnectionDone()))
            if not moved:
                return

    def request(self, data: bytes) -> bytes:
        self.seen.data = b""
        self.client_tls.write(data)
        self.pump()
        return self.seen.data

    def origin_saw(self, index: int = 0) -> bytes:
        return self.origins[index][2].data

    def origin_answer(self, data: bytes, index: int = 0) -> bytes:
        self.origins[index][0].write(data)
        self.pump()
        return self.seen.data
