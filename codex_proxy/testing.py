"""
Fakes for tests, ours and embedders': each implements the real interface.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Type

from twisted.internet.interfaces import IAddress, IHostResolution, IResolutionReceiver

from codex_proxy.audit import Auditor
from codex_proxy.decider import NetworkPolicyRequest
from codex_proxy.model import IPAddress, Verdict
from codex_proxy.resolver import TableResolver


class StaticResolver(TableResolver):
    """
    Resolves names from a fixed table of address strings, synchronously.
    Unknown names resolve to nothing (a DNS failure). Every looked-up name
    is recorded in C{lookups}, so tests can check which names were never
    resolved.
    """

    def __init__(self, table: Mapping[str, Iterable[str]]) -> None:
        super().__init__({name: _ips(found) for name, found in table.items()})
        self.lookups: List[str] = []

    def set(self, name: str, addresses: Iterable[str]) -> None:  # type: ignore[override]
        super().set(name, _ips(addresses))

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[Type[IAddress]]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.lookups.append(hostName)
        return super().resolveHostName(
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
