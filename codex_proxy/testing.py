"""
Fakes for tests, ours and embedders': each provides the interface of the
seam it fills (C{tests/test_testing.py} checks every one with
C{verifyObject}): L{StaticResolver} Twisted's C{IHostnameResolver},
L{RecordingAuditor} L{IAuditor} (as the L{Auditor} it extends),
L{RecordingDecider} L{IPolicyDecider}.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Type

from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from zope.interface import implementer

from codex_proxy.audit import Auditor
from codex_proxy.decider import NetworkPolicyRequest
from codex_proxy.interfaces import IPolicyDecider
from codex_proxy.model import IPAddress, Verdict
from codex_proxy.resolver import TableResolver


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
