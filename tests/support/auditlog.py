"""
Small audit logs for the C{codexproxy report} tests: a config whose policy
the report explains, and audit lines exactly as the auditor writes them.
"""

from __future__ import annotations

import json
from typing import Optional

from codex_proxy.audit import decision_fields
from codex_proxy.model import Decision, Protocol, ProxyRequest, Reason, Source, Verdict

CONFIG = """\
[network]
enabled = true
allowed_domains = ["allowed.example", "*.wild.example"]
denied_domains = ["denied.example"]
"""

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z



def event(
    host: str,
    port: int = 443,
    protocol: Protocol = Protocol.HTTPS_CONNECT,
    reason: Optional[Reason] = Reason.NOT_ALLOWED,
    at: float = T0,
    identity: Optional[str] = None,
) -> str:
    """
    One audit line exactly as the auditor writes it.
    """
    method = {Protocol.HTTPS_CONNECT: "CONNECT", Protocol.HTTP: "GET"}.get(protocol)
    request = ProxyRequest(
        protocol, host, port, method=method, client="127.0.0.1:5000", command=identity, client_identity=identity
    )
    decision = Decision.ALLOW if reason is None else Decision.DENY
    verdict = Verdict(request, host, decision, Source.BASELINE_POLICY, reason)
    return json.dumps(decision_fields(verdict, at), separators=(",", ":"))
