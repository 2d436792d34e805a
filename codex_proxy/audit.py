"""
Audit events: one structured event per policy decision (SPEC §9.3).

Events go through C{twisted.logger} in the namespace
C{codex_otel.network_proxy}; the flat, dotted field mapping is under the
event key C{"audit"} so observers (a JSON-lines file, an exporter) can take it
as it is. Nothing here ever sees a URL path, a query or a credential: the
fields are built from a L{Verdict} alone.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Mapping, Optional

from twisted.logger import Logger

from codex_proxy.model import Verdict

EVENT_NAME = "codex.network_proxy.policy_decision"
NAMESPACE = "codex_otel.network_proxy"

_log = Logger(namespace=NAMESPACE)


def rfc3339(seconds: float) -> str:
    """
    Format a POSIX timestamp as RFC 3339 UTC with milliseconds and C{Z}.
    """
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def decision_fields(
    verdict: Verdict, timestamp: float, metadata: Mapping[str, str] = {}
) -> Dict[str, Any]:
    """
    The flat field mapping of one decision event.
    """
    request = verdict.request
    fields: Dict[str, Any] = {
        "event.name": EVENT_NAME,
        "event.timestamp": rfc3339(timestamp),
        "network.policy.scope": "domain" if request.unix_socket is None else "non_domain",
        "network.policy.decision": verdict.decision.value,
        "network.policy.source": verdict.source.value,
        "network.policy.reason": (
            verdict.reason.value if verdict.reason is not None else "allowed"
        ),
        "network.transport.protocol": request.protocol.value,
        "server.address": verdict.host,
        "server.port": request.port,
        "http.request.method": request.method or "none",
        "client.address": request.client or "unknown",
        "network.policy.override": verdict.override,
    }
    fields.update(metadata)
    return fields


class Auditor:
    """
    Emits decision events, stamped by an injected clock.

    @ivar metadata: optional fields added to every event
        (C{conversation.id}, C{app.version}, C{user.account_id}).
    """

    def __init__(
        self,
        seconds: Callable[[], float],
        metadata: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._seconds = seconds
        self.metadata = dict(metadata or {})

    def record(self, verdict: Verdict) -> Dict[str, Any]:
        fields = decision_fields(verdict, self._seconds(), self.metadata)
        _log.info(
            "policy decision {decision} ({reason}) for {protocol} {host}:{port}",
            decision=fields["network.policy.decision"],
            reason=fields["network.policy.reason"],
            protocol=fields["network.transport.protocol"],
            host=fields["server.address"],
            port=fields["server.port"],
            audit=fields,
        )
        return fields


__all__ = ["Auditor", "EVENT_NAME", "NAMESPACE", "decision_fields", "rfc3339"]
