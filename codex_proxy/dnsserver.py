"""
The DNS listener (SPEC §14.2): a loopback resolver for a sandbox that
answers A and AAAA queries only for names the policy allows, from the same
vetted resolution a connection to the name would use, so that a sandboxed
program can look up what it may reach and nothing else.

Every A/AAAA query is one policy decision (protocol C{dns}, audited once by
the L{PolicyService}): a name that is not allowed is REFUSED and never looked
up; a name whose answers SPEC §5.1/§5.3 refuse is REFUSED; a resolver
failure is SERVFAIL. Other query types and classes are REFUSED before any
decision. Answers carry TTL 0, so a client asks again (and is decided
again under the current policy) every time.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, cast

from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.names import dns, server
from twisted.python.failure import Failure

from codex_proxy.connections import Connections
from codex_proxy.errors import UpstreamError
from codex_proxy.model import Protocol, ProxyRequest, Verdict
from codex_proxy.policyservice import PolicyService

_log = Logger()

#: The port a DNS query is decided for. A lookup names no port, so 0: only
#: patterns for every port decide it (SPEC §3.1). A name allowlisted on one
#: port only (C{api.example:443}) is not answered, and a port denial
#: (C{*:53}, C{mail.example:25}) does not refuse lookups: the connections
#: themselves are still decided per port by the HTTP and SOCKS5 listeners.
DNS_PORT = 0

#: The address family each answered query type asks for.
_FAMILIES = {dns.A: 4, dns.AAAA: 6}


class DNSFactory(server.DNSServerFactory):
    """
    Serves DNS over TCP (as a protocol factory) and UDP (through
    L{datagram}), each query decided by C{policy}.
    """

    def __init__(self, policy: PolicyService, connections: Connections) -> None:
        """
        @param connections: where TCP client connections register while
            open, so that a shutdown closes them with the rest.
        """
        super().__init__()
        # We resolve on the client's behalf: answers say recursion is available.
        self.canRecurse = True
        self._policy = policy
        self._connections = connections

    def connectionMade(self, protocol: dns.DNSProtocol) -> None:
        super().connectionMade(protocol)
        self._connections.opened(cast(ITCPTransport, protocol.transport))

    def connectionLost(self, protocol: dns.DNSProtocol) -> None:
        super().connectionLost(protocol)
        self._connections.closed(cast(ITCPTransport, protocol.transport))

    def datagram(self) -> dns.DNSDatagramProtocol:
        """
        The UDP side of this listener, answering through this factory.
        """
        return dns.DNSDatagramProtocol(controller=self)

    def handleQuery(
        self, message: dns.Message, protocol: Any, address: Optional[Tuple[str, int]]
    ) -> defer.Deferred[None]:
        """
        Decide the first query of C{message} (as every DNS server does) and
        reply: answers of the asked family, REFUSED or SERVFAIL.
        """
        query = message.queries[0]
        family = _FAMILIES.get(query.type)
        if family is None or query.cls != dns.IN:
            self._reply(protocol, message, address, dns.EREFUSED)
            return defer.succeed(None)
        peer = address if address is not None else _peer(protocol)
        request = ProxyRequest(
            Protocol.DNS,
            query.name.name.decode("ascii", "backslashreplace"),
            DNS_PORT,
            client=f"{peer[0]}:{peer[1]}",
        )
        return (
            self._policy.check(request)
            .addCallback(self._answer, query, family, protocol, message, address)
            .addErrback(self._failed, protocol, message, address)
        )

    def _answer(
        self,
        verdict: Verdict,
        query: dns.Query,
        family: int,
        protocol: Any,
        message: dns.Message,
        address: Optional[Tuple[str, int]],
    ) -> None:
        if not verdict.allowed:
            self._reply(protocol, message, address, dns.EREFUSED)
            return
        record = dns.Record_A if family == 4 else dns.Record_AAAA
        answers = [
            dns.RRHeader(
                name=query.name.name,
                type=query.type,
                ttl=0,
                payload=record(str(ip), ttl=0),
            )
            for ip in verdict.addresses
            if ip.version == family
        ]
        self._reply(protocol, message, address, dns.OK, answers)

    def _failed(
        self,
        failure: Failure,
        protocol: Any,
        message: dns.Message,
        address: Optional[Tuple[str, int]],
    ) -> None:
        """
        The name could not be resolved (already audited): SERVFAIL. Anything
        else is our fault: logged, and SERVFAIL too, never an answer.
        """
        if not failure.check(UpstreamError):
            _log.failure("DNS query failed", failure)
        self._reply(protocol, message, address, dns.ESERVER)

    def _reply(
        self,
        protocol: Any,
        message: dns.Message,
        address: Optional[Tuple[str, int]],
        code: int,
        answers: Optional[List[dns.RRHeader]] = None,
    ) -> None:
        response = self._responseFromMessage(message=message, rCode=code, answers=answers)
        self.sendReply(protocol, response, address)


def _peer(protocol: Any) -> Tuple[str, int]:
    """
    The client of a TCP query.
    """
    peer = protocol.transport.getPeer()
    return peer.host, peer.port
