"""
The policy engine with its I/O: the decider, resolution, pinning, audit and
history.

L{PolicyService.check} runs the synchronous core (L{codex_proxy.policy}),
puts an allowlist miss to the policy decider when there is one (SPEC §9.2),
resolves an allowed name exactly once through the injected resolver, rejects
the whole answer when any address is not public (SPEC §5.1), records the
audit event, and hands back the vetted addresses: the only ones the caller
may dial (SPEC §5.2).
"""

from __future__ import annotations

import collections
import ipaddress
from typing import Deque, List, Optional

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.internet.address import IPv4Address, IPv6Address
from zope.interface import implementer

from codex_proxy import addresses as _addresses
from codex_proxy.audit import Auditor
from codex_proxy.decider import (
    Allow,
    Ask,
    Decider,
    NetworkDecision,
    NetworkPolicyRequest,
    consult,
)
from codex_proxy.domains import InvalidHost, normalize_host
from codex_proxy.errors import UpstreamError
from codex_proxy.model import Decision, IPAddress, ProxyRequest, Reason, Source, Verdict
from codex_proxy.policy import Policy, admit, decide, is_local_target

#: How many blocked decisions L{PolicyService.blocked} remembers.
BLOCKED_HISTORY = 200


@implementer(IResolutionReceiver)
class _Collector:
    """
    Gathers one resolution's answers into a Deferred list of IP addresses.
    """

    def __init__(self) -> None:
        self.deferred: defer.Deferred[List[IPAddress]] = defer.Deferred()
        self._found: List[IPAddress] = []

    def resolutionBegan(self, resolution: object) -> None:
        pass

    def addressResolved(self, address: object) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)):
            # getaddrinfo may append a zone to link-local answers.
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
            if ip not in self._found:
                self._found.append(ip)

    def resolutionComplete(self) -> None:
        if not self.deferred.called:
            self.deferred.callback(self._found)


def resolve(
    resolver: IHostnameResolver,
    clock: IReactorTime,
    name: str,
    port: int,
    timeout: float,
) -> defer.Deferred[List[IPAddress]]:
    """
    Resolve C{name} to its addresses, failing with L{UpstreamError} when there
    are none or the resolver does not answer within C{timeout} seconds.
    """
    collector = _Collector()
    resolver.resolveHostName(collector, name, port)
    d = collector.deferred
    d.addTimeout(timeout, clock)

    def check(found: List[IPAddress]) -> List[IPAddress]:
        if not found:
            raise UpstreamError(
                Reason.UPSTREAM_DNS_FAILED, f"{name} did not resolve to any address"
            )
        return found

    def timedOut(failure):  # type: ignore[no-untyped-def]
        failure.trap(defer.TimeoutError)
        raise UpstreamError(
            Reason.UPSTREAM_DNS_FAILED, f"resolving {name} timed out after {timeout}s"
        )

    d.addCallbacks(check, timedOut)
    return d


class PolicyService:
    """
    Decides requests against the current policy; C{reload} swaps the policy
    atomically for decisions started afterwards.

    @ivar decider: the embedder's policy decider, or C{None}.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        resolver: IHostnameResolver,
        clock: IReactorTime,
        auditor: Optional[Auditor] = None,
        resolve_timeout: float = 10.0,
        decider: Optional[Decider] = None,
        decider_timeout: float = 30.0,
    ) -> None:
        self.policy = policy
        self.decider = decider
        self._resolver = resolver
        self._clock = clock
        self._auditor = auditor or Auditor(clock.seconds)
        self._resolve_timeout = resolve_timeout
        self._decider_timeout = decider_timeout
        self._blocked: Deque[Verdict] = collections.deque(maxlen=BLOCKED_HISTORY)

    def reload(self, policy: Policy) -> None:
        self.policy = policy

    def blocked(self) -> List[Verdict]:
        """
        The most recent blocked decisions, oldest first.
        """
        return list(self._blocked)

    def check(self, request: ProxyRequest) -> defer.Deferred[Verdict]:
        """
        Decide C{request}. Fires with the L{Verdict} (allowed ones carry the
        vetted addresses), or fails with L{UpstreamError} when an allowed name
        cannot be resolved. Exactly one audit event is recorded either way.
        Cancelling it while the decider or the resolver is busy records
        nothing: no decision was made.
        """
        policy = self.policy
        verdict = decide(policy, request)
        decider = self.decider
        if (
            verdict.reason is Reason.NOT_ALLOWED
            and decider is not None
            and not policy.managed_allowed_domains_only
        ):
            asked = NetworkPolicyRequest(
                protocol=request.protocol,
                host=verdict.host,
                port=request.port,
                client_addr=request.client,
                method=request.method,
                command=request.command,
            )
            d = consult(decider, asked, self._clock, self._decider_timeout)
            d.addCallback(lambda decision: self._overruled(policy, verdict, decision))
            return d
        return self._settle(policy, verdict)

    def _overruled(
        self, policy: Policy, verdict: Verdict, decision: NetworkDecision
    ) -> defer.Deferred[Verdict]:
        """
        Apply the decider's answer to an allowlist miss: an allow goes on
        through the mode guard and vetting like any allowlisted host.
        """
        if isinstance(decision, Allow):
            admitted = admit(policy, verdict.request, verdict.host, override=True)
            if admitted.allowed:
                admitted = attrs.evolve(admitted, source=Source.DECIDER)
            return self._settle(policy, admitted)
        blocked = attrs.evolve(
            verdict,
            decision=Decision.ASK if isinstance(decision, Ask) else Decision.DENY,
            source=Source.DECIDER,
            reason=Reason.POLICY_DENIED,
            detail=decision.reason,
        )
        return defer.succeed(self._record(blocked))

    def _settle(self, policy: Policy, verdict: Verdict) -> defer.Deferred[Verdict]:
        """
        Record a final verdict, or resolve and vet the name of an allowed one.
        """
        request = verdict.request
        if not verdict.allowed or verdict.addresses or request.unix_socket is not None:
            return defer.succeed(self._record(verdict))
        d = resolve(
            self._resolver,
            self._clock,
            verdict.host,
            request.port,
            self._resolve_timeout,
        )
        d.addCallbacks(
            lambda found: self._vet(policy, verdict, found),
            lambda failure: self._resolutionFailed(verdict, failure),
        )
        return d

    def refuse(self, request: ProxyRequest, reason: Reason) -> Verdict:
        """
        Deny C{request} for a reason of the proxy's own state (C{reason} is
        L{Reason.TOO_MANY_CONNECTIONS}), without consulting the policy:
        one C{proxy_state} audit event, as for L{check}.
        """
        try:
            host = normalize_host(request.host)
        except InvalidHost:
            host = request.host
        return self._record(
            Verdict(
                request=request,
                host=host,
                decision=Decision.DENY,
                source=Source.PROXY_STATE,
                reason=reason,
            )
        )

    def check_pinned(self, request: ProxyRequest, tunnel: Verdict) -> defer.Deferred[Verdict]:
        """
        Decide an inner request of an intercepted tunnel (SPEC §6) without
        resolving again: the host was resolved and vetted when C{tunnel} was
        allowed, and an allowed verdict carries the tunnel's addresses. The
        current policy still applies (a reload can block an open tunnel's
        next request, and the pinned addresses are vetted again under it,
        SPEC §2.5); a decider's approval of the tunnel covers its inner
        allowlist misses. Exactly one audit event, as for L{check}.
        """
        policy = self.policy
        verdict = decide(policy, request)
        if verdict.reason is Reason.NOT_ALLOWED and tunnel.override:
            verdict = admit(policy, request, verdict.host, override=True)
        if verdict.allowed:
            return defer.succeed(self._vet(policy, verdict, list(tunnel.addresses)))
        return defer.succeed(self._record(verdict))

    def _vet(self, policy: Policy, verdict: Verdict, found: List[IPAddress]) -> Verdict:
        # An exactly allowlisted local name (localhost) may resolve locally;
        # any other name with one non-public answer is refused whole.
        if not (policy.allow_local_binding or is_local_target(verdict.host)):
            if not all(_addresses.is_public(ip) for ip in found):
                verdict = attrs.evolve(
                    verdict,
                    decision=Decision.DENY,
                    source=Source.BASELINE_POLICY,
                    reason=Reason.NOT_ALLOWED_LOCAL,
                    intercept=False,
                    override=False,
                )
                return self._record(verdict)
        return self._record(attrs.evolve(verdict, addresses=tuple(found)))

    def _resolutionFailed(self, verdict: Verdict, failure):  # type: ignore[no-untyped-def]
        failure.trap(UpstreamError)
        failed = attrs.evolve(
            verdict,
            decision=Decision.DENY,
            reason=failure.value.reason,
            intercept=False,
            override=False,
        )
        # Audited as the end of this decision, but a DNS failure is no block.
        self._auditor.record(failed)
        return failure

    def _record(self, verdict: Verdict) -> Verdict:
        self._auditor.record(verdict)
        if not verdict.allowed:
            self._blocked.append(verdict)
        return verdict
