"""
The SOCKS5 listener's in-memory harness: request builders, fake UDP ports,
a reactor that hands them out, and a resolver whose answers the test fires.
"""


from __future__ import annotations

import struct
from typing import Any, List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IReactorUDP, IUDPTransport
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy import _socks5wire as wire
from codex_proxy.config import Limits
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.socks5 import SOCKS5Factory, SOCKS5Protocol
from codex_proxy.testing import RecordingAuditor, StaticResolver
from codex_proxy.upstream import Upstream
from support.transports import TCPTransport

PUBLIC = "203.0.114.10"
PUBLIC6 = "2001:4860::8888"
ALLOW = ["origin.test", "**.example.com", "127.0.0.1", PUBLIC6]
NO_AUTH = b"\x05\x01\x00"


def connect(host: str, port: int, command: int = wire.CMD_CONNECT) -> bytes:
    """
    A request for C{host} (a name, or an IP literal sent as such).
    """
    if ":" in host:
        import ipaddress

        address = b"\x04" + ipaddress.IPv6Address(host).packed
    elif host.replace(".", "").isdigit():
        address = b"\x01" + bytes(int(p) for p in host.split("."))
    else:
        address = b"\x03" + bytes([len(host)]) + host.encode()
    return bytes([5, command, 0]) + address + struct.pack("!H", port)


def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return wire.encode_reply(code, host, port)


def datagram(host: str, port: int, payload: bytes, frag: int = 0) -> bytes:
    """
    A SOCKS5 UDP request datagram (RFC 1928 §7) for C{host}.
    """
    return b"\x00\x00" + bytes([frag]) + connect(host, port)[3:] + payload


def associate(h: "Harness", declared_port: int = 7000) -> Tuple[Any, Any]:
    """
    Open an association; return the client-side UDP port and its protocol.
    """
    h.send(NO_AUTH + connect("0.0.0.0", declared_port, wire.CMD_UDP_ASSOCIATE))
    client_side = h.reactor.udp[0]
    assert client_side.interface == "127.0.0.1"
    assert h.client.value() == b"\x05\x00" + reply(0, "127.0.0.1", client_side.number)
    return client_side, client_side.protocol


@implementer(IUDPTransport)
class FakeUDPPort:
    """
    What C{listenUDP} returns here: records what is written.
    """

    def __init__(self, protocol: Any, interface: str, number: int) -> None:
        self.protocol = protocol
        self.interface = interface
        self.number = number
        self.written: List[Tuple[bytes, Tuple[str, int]]] = []
        self.listening = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface, self.number)

    def write(self, data: bytes, addr: Tuple[str, int]) -> None:
        self.written.append((data, addr))

    def stopListening(self) -> None:
        self.listening = False

    def connect(self, host: str, port: int) -> None:
        raise NotImplementedError("the UDP relay never connects its port")

    def setBroadcastAllowed(self, enabled: bool) -> None:
        raise NotImplementedError("the UDP relay never broadcasts")

    def getBroadcastAllowed(self) -> bool:
        return False


@implementer(IReactorUDP)
class Reactor(MemoryReactorClock):
    """
    A memory reactor with UDP ports too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.udp: List[FakeUDPPort] = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):  # type: ignore[override]
        fake = FakeUDPPort(protocol, interface, 40000 + len(self.udp))
        protocol.makeConnection(fake)
        self.udp.append(fake)
        return fake


@implementer(IHostnameResolver)
class PendingResolver:
    """
    A resolver that answers only when the test says so.
    """

    def __init__(self) -> None:
        self.pending: List[Any] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.pending.append((receiver, hostName, portNumber))
        receiver.resolutionBegan(None)
        return None

    def answer(self, ip: str) -> None:
        receiver, _, port = self.pending.pop(0)
        receiver.addressResolved(IPv4Address("TCP", ip, port))
        receiver.resolutionComplete()


class Harness:
    def __init__(
        self,
        trickle: bool,
        policy: Optional[Policy] = None,
        resolver: Any = None,
        limits: Limits = Limits(socks_handshake_timeout_s=5, tunnel_idle_s=60),
        enable_udp: bool = True,
    ) -> None:
        self.trickle = trickle
        self.reactor = Reactor()
        self.resolver = resolver or StaticResolver({"origin.test": [PUBLIC]})
        self.auditor = RecordingAuditor(self.reactor.seconds)
        self.service = PolicyService(
            policy or Policy.build(allowed=ALLOW, denied=["bad.example.com"]),
            resolver=self.resolver,
            clock=self.reactor,
            auditor=self.auditor,
        )
        self.factory = SOCKS5Factory(
            self.service,
            Upstream(self.reactor, 10),
            self.reactor,
            limits,
            enable_udp=enable_udp,
            reactor=self.reactor,
        )
        self.proto = self.connectClient()
        self.client: TCPTransport = self.proto.transport

    def connectClient(self, port: int = 5555) -> SOCKS5Protocol:
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(
            TCPTransport(
                hostAddress=IPv4Address("TCP", "127.0.0.1", 1080),
                peerAddress=IPv4Address("TCP", "127.0.0.1", port),
            )
        )
        return proto

    def send(self, data: bytes, proto: Optional[SOCKS5Protocol] = None) -> None:
        proto = proto or self.proto
        if self.trickle:
            for i in range(len(data)):
                proto.dataReceived(data[i : i + 1])
        else:
            proto.dataReceived(data)

    def dials(self) -> List[Tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def accept(self) -> Tuple[Any, TCPTransport]:
        factory = self.reactor.tcpClients[-1][2]
        proto = factory.buildProtocol(None)
        transport = TCPTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 61000))
        proto.makeConnection(transport)
        return proto, transport

    def fail(self, reason: Exception) -> None:
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(reason))

    def reasons(self) -> List[str]:
        return [e["network.policy.reason"] for e in self.auditor.events]
