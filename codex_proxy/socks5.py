"""
The SOCKS5 listener (RFC 1928, SPEC §6a): CONNECT tunnels and UDP
ASSOCIATE, under the same policy as the HTTP listener.

One L{SOCKS5Protocol} per client connection, an explicit state machine:

    GREETING ─▶ [AUTH] ─▶ REQUEST ─CONNECT─▶ DECIDING ─allow─▶ DIALLING ─▶ RELAYING
                             │                   │                 │
                             │                 deny ──▶ REP, close ◀── failed
                             └─UDP ASSOCIATE─▶ ASSOCIATED (until the TCP connection ends)

The pending policy or dial Deferred is held in C{_work} so a client that
goes away cancels it; the handshake (greeting to request) must complete
within C{limits.socks_handshake_timeout_s}. Admission, the read gate,
internal errors, the relay and the outcome event are the shared
L{codex_proxy._connection.ClientConnection}'s. Every decision, UDP
ASSOCIATE itself included, is the policy service's; reply codes come from
L{codex_proxy.errors}, never from a call site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy import _handover, _socks5wire as wire
from codex_proxy._connection import ClientConnection, client_address, tune
from codex_proxy._text import escape
from codex_proxy.config import Limits
from codex_proxy.errors import (
    SOCKS_COMMAND_NOT_SUPPORTED,
    SOCKS_GENERAL_FAILURE,
    UpstreamError,
    reply_for,
)
from codex_proxy.connections import Connections
from codex_proxy.model import Protocol as Proto, ProxyRequest, Reason, Verdict
from codex_proxy.policyservice import PolicyService
from codex_proxy.relay import Timer
from codex_proxy.socks5udp import UDPAssociation
from codex_proxy.upstream import IUpstream, Outbound, Route

if TYPE_CHECKING:
    from codex_proxy.httpproxy import HTTPProxyFactory

_log = Logger()

GREETING = "GREETING"
AUTH = "AUTH"
REQUEST = "REQUEST"
DECIDING = "DECIDING"
DIALLING = "DIALLING"
RELAYING = "RELAYING"
ASSOCIATED = "ASSOCIATED"
CLOSED = "CLOSED"

_HANDSHAKE = (GREETING, AUTH, REQUEST)
#: The C{server.address} audited for a refusal before any destination is
#: named (a failed RFC 1929 sub-negotiation).
_NO_HOST = "unknown"


class SOCKS5Factory(Factory["SOCKS5Protocol"]):
    """
    Builds L{SOCKS5Protocol}s sharing one policy service and dialer.

    @ivar associations: UDP associations open now (at most
        C{limits.max_udp_associations}).
    """

    noisy = False

    def __init__(
        self,
        policy: PolicyService,
        upstream: IUpstream,
        clock: IReactorTime,
        limits: Limits = Limits(),
        enable_udp: bool = True,
        reactor: Any = None,
        connections: Optional[Connections] = None,
        https: Optional["HTTPProxyFactory"] = None,
    ) -> None:
        """
        @param https: the HTTP listener whose interception serves the SOCKS5
            CONNECTs that limited mode intercepts (SPEC §6), when C{mitm} is on.
        """
        self.policy = policy
        self.upstream = upstream
        self.clock = clock
        self.limits = limits
        self.enable_udp = enable_udp
        self.reactor = reactor
        self.associations = 0
        self.connections = connections if connections is not None else Connections()
        self.https = https

    def buildProtocol(self, addr: Optional[IAddress]) -> "SOCKS5Protocol":
        proto = SOCKS5Protocol()
        proto.factory = self
        proto.client = client_address(addr)
        return proto


@implementer(IHalfCloseableProtocol)
class SOCKS5Protocol(ClientConnection):
    """
    One client connection of the SOCKS5 listener.
    """

    listener = "socks5"
    factory: SOCKS5Factory

    # -- connection events ------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        tune(self.transport)
        self._state = GREETING
        self._buffer = b""
        self._work: Optional[defer.Deferred[Any]] = None
        self._udp: Optional[UDPAssociation] = None
        # Why every request of this connection is refused, if it is.
        self._refusal: Optional[Reason] = None if self.admitted else Reason.TOO_MANY_CONNECTIONS
        # The connection's one timer: the handshake's limit, then the
        # tunnel's idle watch.
        self._timer = Timer(self.factory.clock)
        self._timer.arm(self.factory.limits.socks_handshake_timeout_s, self._handshakeTimedOut)

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.fromClient(data)
            return
        state = self._state
        if state in _HANDSHAKE:
            self._buffer += data
            self._advance()
        elif state is DECIDING or state is DIALLING:
            # Sent while the request is decided or dialled: the tunnel's first bytes.
            self.keep(data)
        # ASSOCIATED: the control connection carries nothing; CLOSED: ignore.

    def readConnectionLost(self) -> None:
        self.clientEOF = True
        if self.relay is not None:
            self.relay.clientEOF()
        elif self._state is not DECIDING and self._state is not DIALLING:
            # A handshake that can now never end, or the end of an association.
            self.close()

    def writeConnectionLost(self) -> None:
        pass

    def abandon(self) -> None:
        self._state = CLOSED
        self._timer.stop()
        work, self._work = self._work, None
        if work is not None:
            work.cancel()
        udp, self._udp = self._udp, None
        if udp is not None:
            udp.close()
            self.factory.associations -= 1
            # Relayed datagrams count with the connection's bytes (SPEC §13).
            self.bytesUp += udp.bytesUp
            self.bytesDown += udp.bytesDown

    def _handshakeTimedOut(self) -> None:
        self.abort("timeout")

    # -- handshake --------------------------------------------------------

    def _advance(self) -> None:
        try:
            while True:
                state = self._state
                if state is GREETING:
                    if not self._greeting():
                        return
                elif state is AUTH:
                    if not self._auth():
                        return
                elif state is REQUEST:
                    parsed = wire.parse_request(self._buffer)
                    if parsed is None:
                        return
                    request, rest = parsed
                    self._buffer = b""
                    self.keep(rest)
                    self._request(request)
                    return
                else:
                    return
        except wire.SocksProtocolError as e:
            self.noteEnd("bad_request")
            if self._state is REQUEST:
                self._refuse(e.reply)
                return
            if self._state is AUTH:
                self.transport.write(wire.encode_auth_status(False))
            self.close()

    def _greeting(self) -> bool:
        parsed = wire.parse_greeting(self._buffer)
        if parsed is None:
            return False
        greeting, self._buffer = parsed
        # Username/password when offered, so the username names the client;
        # only that when clients must authenticate (SPEC §11).
        credentials = self.factory.policy.policy.credentials
        if wire.METHOD_USERNAME_PASSWORD in greeting.methods:
            self.transport.write(wire.encode_method(wire.METHOD_USERNAME_PASSWORD))
            self._state = AUTH
        elif wire.METHOD_NO_AUTH in greeting.methods and not credentials.required:
            self.transport.write(wire.encode_method(wire.METHOD_NO_AUTH))
            self._state = REQUEST
        else:
            self.transport.write(wire.encode_method(wire.METHOD_NO_ACCEPTABLE))
            self.noteEnd("bad_request")
            self.close()
            return False
        return True

    def _auth(self) -> bool:
        parsed = wire.parse_auth(self._buffer)
        if parsed is None:
            return False
        credentials, self._buffer = parsed
        refusal = self.authenticateSOCKS(credentials.username, credentials.password)
        failed = refusal is Reason.CLIENT_AUTH_FAILED
        self.transport.write(wire.encode_auth_status(not failed))
        if failed:
            asked = ProxyRequest(protocol=Proto.SOCKS5_TCP, host=_NO_HOST, port=0, client=self.client)
            self.noteVerdict(self.factory.policy.refuse(asked, Reason.CLIENT_AUTH_FAILED))
            self.close()
            return False
        # Authenticated but over its limit: the request gets REP 0x01.
        self._refusal = self._refusal or refusal
        self._state = REQUEST
        return True

    def _request(self, request: wire.Request) -> None:
        # Reading goes on while the request is decided and dialled (pausing
        # costs two epoll calls per tunnel): what arrives is kept, up to a
        # bound, for the tunnel.
        self._timer.disarm()
        if self._refusal is not None:
            self._overload(request, self._refusal)
        elif request.command == wire.CMD_CONNECT:
            self._connect(request)
        elif request.command == wire.CMD_UDP_ASSOCIATE and self.factory.enable_udp:
            self._associate(request)
        else:
            self.noteEnd("bad_request")
            self._refuse(SOCKS_COMMAND_NOT_SUPPORTED)

    def _refuse(self, reply: int) -> None:
        self.transport.write(wire.encode_reply(reply))
        self.close()

    def _proxyRequest(self, request: wire.Request) -> ProxyRequest:
        """
        What the policy service decides about C{request}.
        """
        udp = request.command == wire.CMD_UDP_ASSOCIATE
        return ProxyRequest(
            protocol=Proto.SOCKS5_UDP if udp else Proto.SOCKS5_TCP,
            host=request.host,
            port=request.port,
            client=self.client,
            command=self.identity,
            client_identity=self.identity,
        )

    def _refuseFor(self, verdict: Verdict) -> None:
        assert verdict.reason is not None
        self.noteVerdict(verdict)
        self._refuse(reply_for(verdict.reason).socks)

    def _overload(self, request: wire.Request, reason: Reason) -> None:
        """
        Refuse the request of a connection beyond C{limits.max_connections}
        or C{limits.max_connections_per_client}, with its audit event.
        """
        asked = self._proxyRequest(request)
        self._refuseFor(self.factory.policy.refuse(asked, reason))

    # -- CONNECT ----------------------------------------------------------

    def _connect(self, request: wire.Request) -> None:
        self._state = DECIDING
        asked = self._proxyRequest(request)
        verdict = self.factory.policy.decide_now(asked)
        if verdict is not None:
            self._decided(verdict)
            return
        d = self._work = self.factory.policy.check(asked)
        self.expect(d, self._decided, self._failed)

    def _decided(self, verdict: Verdict) -> None:
        self._work = None
        if not verdict.allowed:
            self._refuseFor(verdict)
            return
        self.noteVerdict(verdict)
        if verdict.intercept and self.factory.https is None:
            # The policy asked for interception that this listener cannot do.
            _log.error(
                "refusing an intercepted SOCKS5 CONNECT to {host}: no MITM configured",
                host=escape(verdict.host),
            )
            self.noteEnd("error")
            self._refuse(SOCKS_GENERAL_FAILURE)
            return
        self._state = DIALLING
        # Chained through the HTTPS_PROXY/ALL_PROXY parent, as HTTP CONNECT is (SPEC §7).
        upstream = self.factory.upstream
        route = upstream.route(verdict, tunnel=True)
        d = self._work = upstream.dial(route)
        self.expect(d, lambda out: self._connected(out, verdict, route), self._failed)

    def _failed(self, failure: Failure) -> None:
        self._work = None
        e = failure.value
        if not isinstance(e, UpstreamError):
            failure.raiseException()
        self.noteEnd("failed", e.reason.value)
        self._refuse(reply_for(e.reason).socks)

    def _connected(self, out: Outbound, verdict: Verdict, route: Route) -> None:
        self._work = None
        tune(out.transport)
        bound = out.transport.getHost()
        self.transport.write(wire.encode_reply(wire.REP_SUCCEEDED, bound.host, bound.port))
        if verdict.intercept:
            self._handOver(verdict, out, route)
            return
        self._state = RELAYING
        self.joinRelay(
            out,
            self.factory.limits.tunnel_idle_s,
            fromClient=self.takePending(),
            clientEOF=self.clientEOF,
            timer=self._timer,
        )

    def _handOver(self, verdict: Verdict, out: Outbound, route: Route) -> None:
        """
        Give the answered connection to the HTTP listener's interception
        (SPEC §6, §12): from here on its protocol serves it, still counted
        as this listener's connection, for the client that authenticated
        here, and ending with one outcome event, that protocol's.
        """
        https = self.factory.https
        assert https is not None
        handshake = self.takePending()
        self.closing = True
        self._state = CLOSED
        self._timer.stop()
        _handover.intercept(https, self, verdict, out, route, handshake)

    # -- UDP ASSOCIATE ----------------------------------------------------

    def _associate(self, request: wire.Request) -> None:
        # An association's control connection holds no timer.
        self._timer.stop()
        factory = self.factory
        verdict = factory.policy.check_association(
            self._proxyRequest(request),
            full=factory.associations >= factory.limits.max_udp_associations,
        )
        if not verdict.allowed:
            self._refuseFor(verdict)
            return
        self.noteVerdict(verdict)
        local = self.transport.getHost()
        udp = UDPAssociation(
            factory.reactor,
            factory.policy,
            client_ip=self.transport.getPeer().host,
            client_port=request.port,
            listen_ip=local.host,
            client=self.client,
            identity=self.identity,
        )
        try:
            port = udp.start()
        except error.CannotListenError as e:
            _log.warn("cannot open a SOCKS5 UDP relay: {error}", error=e)
            self.noteEnd("error")
            self._refuse(SOCKS_GENERAL_FAILURE)
            return
        self._udp = udp
        factory.associations += 1
        self._state = ASSOCIATED
        self.transport.write(wire.encode_reply(wire.REP_SUCCEEDED, local.host, port))
        # Read on, only to notice when the client ends the association: the
        # control connection carries nothing, so what came along is dropped.
        self.takePending()
