"""
The policy engine with its I/O: the decider, resolution, pinning, audit and
history.

L{PolicyService.check} runs the synchronous core (L{codex_proxy.policy}),
puts an allowlist miss to the policy decider when there is one (SPEC §9.2),
resolves an allowed name exactly once through the injected resolver, vets
every address against the address ranges and the local-address rule
(SPEC §5.1, §5.3; L{codex_proxy.policy.vet}), records the audit event, and
hands back the vetted addresses: the only ones the caller may dial (SPEC
§5.2).
"""

from __future__ import annotations

import collections
import ipaddress
from typing import Any, Callable, Deque, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python.failure import Failure
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
from codex_proxy.metrics import timed
from codex_proxy.model import Decision, IPAddress, ProxyRequest, Reason, Source, Verdict
from codex_proxy.policy import (
    Policy,
    admit,
    decide,
    decide_association,
    refused,
    vet,
)

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

    def timedOut(failure: Failure) -> List[IPAddress]:
        failure.trap(defer.TimeoutError)
        raise UpstreamError(
            Reason.UPSTREAM_DNS_FAILED, f"resolving {name} timed out after {timeout}s"
        )

    d.addCallbacks(check, timedOut)
    return d


def _own_form(ip: IPAddress) -> IPAddress:
    """
    The address a connection to C{ip} reaches: an IPv4-mapped IPv6 address
    reaches its IPv4 address.
    """
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip if mapped is None else mapped


class PolicyService:
    """
    Decides requests against the current policy; C{reload} swaps the policy
    atomically for decisions started afterwards.

    @ivar decider: the embedder's policy decider, or C{None}.
    @ivar generation: how many times the policy was swapped; a verdict
        kept for reuse (a UDP destination's, SPEC §6a) holds only while
        this is unchanged.
    @ivar own_addresses: the proxy's listening addresses as last given to
        L{set_own_addresses}: C{(host, port)} pairs.
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
        observe: Optional[Callable[[float], None]] = None,
    ) -> None:
        """
        @param observe: given the seconds each L{check} took to its verdict
            (the decision latency histogram), when metrics are kept.
        """
        self.policy = policy
        self._observe = observe
        self.generation = 0
        self.decider = decider
        self._resolver = resolver
        self._clock = clock
        self._auditor = auditor or Auditor(clock.seconds)
        self._resolve_timeout = resolve_timeout
        self._decider_timeout = decider_timeout
        self._blocked: Deque[Tuple[Verdict, Dict[str, Any]]] = collections.deque(
            maxlen=BLOCKED_HISTORY
        )
        self.own_addresses: FrozenSet[Tuple[str, int]] = frozenset()
        self._own: FrozenSet[Tuple[IPAddress, int]] = frozenset()
        self._ownAnywhere: FrozenSet[int] = frozenset()
        self._ownPorts: FrozenSet[int] = frozenset()

    def set_own_addresses(self, addresses: Iterable[Tuple[str, int]]) -> None:
        """
        Name the proxy's own listening addresses (the IP as bound, the
        port): from now on a vetted destination that is one of them is
        refused C{not_allowed_local}, whatever the policy says, so the proxy
        never dials itself (SPEC §4.2b). A wildcard listener (C{0.0.0.0},
        C{::}) stands for every address of this machine on its port: any
        non-public address matches it.

        @raise ValueError: a host is not an IP address.
        """
        given = frozenset(addresses)
        exact: Set[Tuple[IPAddress, int]] = set()
        anywhere: Set[int] = set()
        for host, port in given:
            ip = _own_form(ipaddress.ip_address(host.split("%", 1)[0]))
            if ip.is_unspecified:
                anywhere.add(port)
            else:
                exact.add((ip, port))
        self.own_addresses = given
        self._own = frozenset(exact)
        self._ownAnywhere = frozenset(anywhere)
        self._ownPorts = frozenset(port for _, port in exact) | self._ownAnywhere

    def reload(self, policy: Policy) -> None:
        """
        Decide by C{policy} from now on, in a new generation.
        """
        self.policy = policy
        self.generation += 1

    def blocked(self) -> List[Verdict]:
        """
        The most recent blocked decisions, oldest first.
        """
        return [verdict for verdict, _ in self._blocked]

    def blocked_events(self) -> List[Dict[str, Any]]:
        """
        The audit fields (SPEC §9.3) of the most recent blocked decisions,
        oldest first.
        """
        return [fields for _, fields in self._blocked]

    def check(self, request: ProxyRequest) -> defer.Deferred[Verdict]:
        """
        Decide C{request}. Fires with the L{Verdict} (allowed ones carry the
        vetted addresses), or fails with L{UpstreamError} when an allowed name
        cannot be resolved. Exactly one audit event is recorded either way.
        Cancelling it while the decider or the resolver is busy records
        nothing: no decision was made.
        """
        if self._observe is None:
            return self._check(request)
        started = self._clock.seconds()
        return timed(self._check(request), self._clock, self._observe, started)

    def _check(self, request: ProxyRequest) -> defer.Deferred[Verdict]:
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
            return consult(decider, asked, self._clock, self._decider_timeout).addCallback(
                lambda decision: self._overruled(policy, verdict, decision)
            )
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
        if verdict.allowed and verdict.addresses:
            # An IP literal: its one address meets the ranges like an answer.
            return defer.succeed(self._vet(policy, verdict, list(verdict.addresses)))
        if not verdict.allowed or request.unix_socket is not None:
            return defer.succeed(self._record(self._notSelf(verdict)))
        d = resolve(
            self._resolver,
            self._clock,
            verdict.host,
            request.port,
            self._resolve_timeout,
        )
        return d.addCallbacks(
            lambda found: self._vet(policy, verdict, found),
            lambda failure: self._resolutionFailed(verdict, failure),
        )

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

    def check_association(self, request: ProxyRequest, *, full: bool) -> Verdict:
        """
        Decide a SOCKS5 UDP ASSOCIATE (SPEC §6a): refused by a disabled
        proxy, in limited mode, or when C{full} (the listener holds
        C{limits.max_udp_associations} already), with one audit event. An
        allowed association is not audited: it names no destination, and
        each of its destinations is decided and audited by L{check}.
        """
        verdict = decide_association(self.policy, request)
        if verdict.allowed and full:
            verdict = attrs.evolve(
                verdict,
                decision=Decision.DENY,
                source=Source.PROXY_STATE,
                reason=Reason.TOO_MANY_UDP_ASSOCIATIONS,
            )
        return verdict if verdict.allowed else self._record(verdict)

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
        """
        Record C{verdict} with the addresses C{found} vetted (SPEC §4.1 step
        7, §5.3), never one of the proxy's own.
        """
        vetted = vet(policy, verdict, found)
        return self._record(self._notSelf(vetted) if vetted.allowed else vetted)

    def _notSelf(self, verdict: Verdict) -> Verdict:
        """
        C{verdict}, refused C{not_allowed_local} when one of its vetted
        addresses is one of the proxy's own listening addresses.
        """
        port = verdict.port
        if port not in self._ownPorts:
            return verdict
        for ip in verdict.addresses:
            if port in self._ownAnywhere and not _addresses.is_public(ip):
                return refused(verdict, Reason.NOT_ALLOWED_LOCAL)
            ip = _own_form(ip)
            if ip.is_unspecified or (ip, port) in self._own:
                return refused(verdict, Reason.NOT_ALLOWED_LOCAL)
        return verdict

    def _resolutionFailed(self, verdict: Verdict, failure: Failure) -> Failure:
        error = failure.value
        if not isinstance(error, UpstreamError):
            return failure
        failed = attrs.evolve(
            verdict,
            decision=Decision.DENY,
            reason=error.reason,
            intercept=False,
            override=False,
        )
        # Audited as the end of this decision, but a DNS failure is no block.
        self._auditor.record(failed)
        return failure

    def _record(self, verdict: Verdict) -> Verdict:
        fields = self._auditor.record(verdict)
        if not verdict.allowed:
            self._blocked.append((verdict, fields))
        return verdict
