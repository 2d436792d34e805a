"""
Fakes for tests, ours and embedders': each implements the real interface.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Type

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet._resolver import HostResolution
from zope.interface import implementer

from codex_proxy.audit import Auditor
from codex_proxy.model import Verdict


@implementer(IHostnameResolver)
class StaticResolver:
    """
    Resolves names from a fixed table, synchronously. Unknown names resolve
    to nothing (a DNS failure). Every looked-up name is recorded in
    C{lookups}, so tests can check which names were never resolved.
    """

    def __init__(self, table: Mapping[str, Iterable[str]]) -> None:
        self._table: Dict[str, List[str]] = {k: list(v) for k, v in table.items()}
        self.lookups: List[str] = []

    def set(self, name: str, addresses: Iterable[str]) -> None:
        self._table[name] = list(addresses)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[Type[IAddress]]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.lookups.append(hostName)
        resolution = HostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for text in self._table.get(hostName, ()):
            ip = ipaddress.ip_address(text)
            cls = IPv4Address if ip.version == 4 else IPv6Address
            resolutionReceiver.addressResolved(cls("TCP", str(ip), portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


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
