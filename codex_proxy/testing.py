"""
Fakes for tests, ours and embedders': each provides the interface of the
seam it fills (C{tests/test_testing.py} checks every one with
C{verifyObject}): L{StaticResolver} Twisted's C{IHostnameResolver},
L{RecordingAuditor} L{IAuditor} (as the L{Auditor} it extends),
L{RecordingDecider} L{IPolicyDecider}.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type

from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from codex_proxy.audit import Auditor
from codex_proxy.connections import Connections
from codex_proxy.decider import NetworkPolicyRequest
from codex_proxy.errors import UpstreamError
from codex_proxy.interfaces import IPolicyDecider
from codex_proxy.model import IPAddress, Reason, Verdict
from codex_proxy.resolver import TableResolver
from codex_proxy.upstream import IUpstream, Outbound, Route, route_for


@implementer(IHostnameResolver)
class StaticResolver:
    """
    Resolves names from a fixed table of address strings, synchronously,
    like a L{TableResolver} without fallback: unknown names resolve to
    nothing (a DNS failure). Every looked-up name is recorded in
    C{lookups}, so tests can check which names were never resolved.
    """

    def __init__(self, table: Mapping[str, Iterable[str]]) -> None:
        self._table = TableResolver({name: _ips(found) for name, found in table.items()})
        self.lookups: List[str] = []

    def set(self, name: str, addresses: Iterable[str]) -> None:
        """
        Answer C{name} with C{addresses} from now on.
        """
        self._table.set(name, _ips(addresses))

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[Type[IAddress]]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.lookups.append(hostName)
        return self._table.resolveHostName(
            resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
        )


def _ips(texts: Iterable[str]) -> List[IPAddress]:
    return [ipaddress.ip_address(text) for text in texts]


class RecordingAuditor(Auditor):
    """
    An L{Auditor} that also keeps every event's fields in C{events}.
    """

    def __init__(self, seconds: Callable[[], float]) -> None:
        super().__init__(seconds)
        self.events: List[Dict[str, Any]] = []

    def record(self, verdict: Verdict) -> Dict[str, Any]:
        fields = super().record(verdict)
        self.events.append(fields)
        return fields


@implementer(IPolicyDecider)
class RecordingDecider:
    """
    A policy decider (SPEC §9.2) that records every request it is asked
    about in C{asked} and answers with C{answer(request)}: a decision, a
    Deferred or a coroutine, exactly like a real decider may.
    """

    def __init__(self, answer: Callable[[NetworkPolicyRequest], Any]) -> None:
        self._answer = answer
        self.asked: List[NetworkPolicyRequest] = []

    def __call__(self, request: NetworkPolicyRequest) -> Any:
        self.asked.append(request)
        return self._answer(request)


@implementer(IUpstream)
class MemoryUpstream:
    """
    An upstream connector that opens nothing: each dial waits in C{dials}
    as (route, Deferred) until the test L{accept}s it, which connects an
    L{Outbound} to a C{StringTransport} (the destination's side: what the
    proxy sent is its C{value()}, what the destination says goes to the
    outbound's C{dataReceived}), or L{refuse}s it.
    """

    def __init__(self, connections: Optional[Connections] = None) -> None:
        self.connections = connections if connections is not None else Connections()
        self.dials: List[Tuple[Route, defer.Deferred[Outbound]]] = []

    def route(self, verdict: Verdict, tunnel: bool) -> Route:
        return route_for(verdict, tunnel, None)

    def dial(self, route: Route) -> defer.Deferred[Outbound]:
        """
        Wait for the test; cancelling (the client left) withdraws the dial.
        """
        d: defer.Deferred[Outbound] = defer.Deferred(lambda d: self.dials.remove((route, d)))
        self.dials.append((route, d))
        return d

    def connect(self, addresses: Sequence[IPAddress], port: int) -> defer.Deferred[Outbound]:
        return self.dial(Route(addresses=tuple(addresses), port=port))

    def accept(self, index: int = 0) -> Tuple[Outbound, StringTransport]:
        """
        The destination of dial C{index} (the oldest waiting, by default)
        accepts.
        """
        _, d = self.dials.pop(index)
        out = Outbound(self.connections)
        transport = StringTransport()
        out.makeConnection(transport)
        d.callback(out)
        return out, transport

    def refuse(self, reason: Reason = Reason.UPSTREAM_REFUSED, index: int = 0) -> None:
        """
        Dial C{index} fails with C{reason}.
        """
        _, d = self.dials.pop(index)
        d.errback(UpstreamError(reason, "refused by the test"))
