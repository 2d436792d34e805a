"""
The contracts of two seams an embedder or a test fills in: who records the
audit event of every decision, and the policy decider hook (SPEC §9.2).

Both are here, apart from their real implementations, so that a fake in
L{codex_proxy.testing} can be checked against the contract with
C{verifyObject} without importing what it stands in for. The resolver seam
needs no interface of ours: it is Twisted's C{IHostnameResolver}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Dict, Union

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from codex_proxy.decider import NetworkDecision, NetworkPolicyRequest
    from codex_proxy.model import Verdict


class IAuditor(Interface):
    """
    Emits the one audit event (SPEC §9.3) of each policy decision.
    """

    metadata = Attribute("Fields added to every event, a mapping of str to str.")

    def record(verdict: Verdict) -> Dict[str, Any]:
        """
        Emit the event of C{verdict} and return its flat, dotted field
        mapping.
        """


class IPolicyDecider(Interface):
    """
    The policy decider hook (SPEC §9.2): consulted for allowlist misses only,
    it may widen the policy by answering C{Allow} in time; anything else,
    an exception and no answer within the timeout included, is a deny.
    """

    def __call__(
        request: NetworkPolicyRequest,
    ) -> Union[NetworkDecision, Deferred[NetworkDecision], Awaitable[NetworkDecision]]:
        """
        Decide about C{request}: answer an C{Allow}, C{Deny} or C{Ask}, a
        Deferred firing with one, or a coroutine returning one.
        """
