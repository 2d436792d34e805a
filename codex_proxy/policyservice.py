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
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorTime,
)
from twisted.python.failure import Failure

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
from codex_proxy.resolver import resolve
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

#: How many verdicts L{PolicyService} keeps for one policy before it
#: starts over. Each new client connection adds one (its requests are keyed
#: with its address, so keep-alive requests hit), next to one per
#: destination and request kind: a few hundred keep memory flat under a
#: stream of new connections, and starting over costs one decision.
VERDICT_CACHE = 256


def _own_form(ip: IPAddress) -> IPAddress:
    """
    The address a connection to C{ip} reaches: an IPv4-mapped IPv6 address
    reaches its IPv4 address.
    """
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip if mapped is None else mapped


class _Verdicts:
    """
    The verdicts decided under one policy in force (a client's own policy
    follows from the identity in the request), kept so that a request
    decided before costs a lookup. By kind of request (all of it but the
    client's address): its decision, and what it settles to when it needs
    neither the decider nor a resolution (an IP literal vetted, a refusal);
    the same destination from another connection costs one copy. By
    request: the verdicts answered at once, so a request repeated on its
    connection costs no copy.

    @ivar policy: the policy in force they were decided under.
    """

    def __init__(self, policy: Optional[Policy]) -> None:
        self.policy = policy
        self._decided: Dict[Tuple[object, ...], Verdict] = {}
        # None: the kind needs the decider or a resolution.
        self._settled: Dict[Tuple[object, ...], Optional[Verdict]] = {}
        self._answered: Dict[ProxyRequest, Verdict] = {}

    @property
    def full(self) -> bool:
        return len(self._answered) >= VERDICT_CACHE or len(self._decided) >= VERDICT_CACHE

    def answer(
        self,
        policy: Policy,
        request: ProxyRequest,
        asks: bool,
        settle: Callable[[Policy, Verdict], Optional[Verdict]],
    ) -> Optional[Verdict]:
        """
        The verdict L{PolicyService.decide_now} answers for C{request}: its
        kind's decision, C{settle}d once per kind; C{None} when it needs a
        resolution, or the decider (C{asks}: an allowlist miss goes to it).
        """
        final = self._answered.get(request)
        if final is not None:
            return None if asks and final.reason is Reason.NOT_ALLOWED else final
        kind = request.kind()
        like = self.decided(policy, request, kind)
        if asks and like.reason is Reason.NOT_ALLOWED:
            return None
        if kind in self._settled:
            settled = self._settled[kind]
        else:
            settled = self._settled[kind] = settle(policy, like)
        if settled is None:
            return None
        final = self._answered[request] = settled if settled.request is request else settled.about(request)
        return final

    def decided(self, policy: Policy, request: ProxyRequest, kind: Tuple[object, ...]) -> Verdict:
        """
        L{decide}C{(policy, request)}, computed once per C{kind}: the
        verdict of the first request of the kind.
        """
        like = self._decided.get(kind)
        if like is None:
            like = self._decided[kind] = decide(policy, request)
        return like


class _OwnAddresses:
    """
    The proxy's own listening addresses, as destinations to refuse. A
    wildcard listener (C{0.0.0.0}, C{::}) stands for every address of this
    machine on its port: any non-public address matches it.

    @ivar given: the C{(host, port)} pairs as given.
    """

    def __init__(self, addresses: Iterable[Tuple[str, int]]) -> None:
        self.given = frozenset(addresses)
        exact: Set[Tuple[IPAddress, int]] = set()
        anywhere: Set[int] = set()
        for host, port in self.given:
            ip = _own_form(ipaddress.ip_address(host.split("%", 1)[0]))
            if ip.is_unspecified:
                anywhere.add(port)
            else:
                exact.add((ip, port))
        self._exact = frozenset(exact)
        self._anywhere = frozenset(anywhere)
        self._ports = frozenset(port for _, port in exact) | self._anywhere

    def includes(self, verdict: Verdict) -> bool:
        """
        Whether one of C{verdict}'s vetted addresses, on its port, is ours.
        """
        port = verdict.port
        if port not in self._ports:
            return False
        for ip in verdict.addresses:
            if port in self._anywhere and not _addresses.is_public(ip):
                return True
            ip = _own_form(ip)
            if ip.is_unspecified or (ip, port) in self._exact:
                return True
        return False


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
        self._own = _OwnAddresses(())
        self.own_addresses = self._own.given
        self._verdicts = _Verdicts(None)

    def set_own_addresses(self, addresses: Iterable[Tuple[str, int]]) -> None:
        """
        Name the proxy's own listening addresses (the IP as bound, the
        port): from now on a vetted destination that is one of them is
        refused C{not_allowed_local}, whatever the policy says, so the proxy
        never dials itself (SPEC §4.2b); see L{_OwnAddresses}.

        @raise ValueError: a host is not an IP address.
        """
        self._own = _OwnAddresses(addresses)
        self.own_addresses = self._own.given
        # Vetted and settled verdicts are decided again.
        self._verdicts = _Verdicts(None)

    def reload(self, policy: Policy) -> None:
        """
        Decide by C{policy} from now on, in a new generation.
        """
        self.policy = policy
        self.generation += 1

    def blocked(self) -> List[Verdict]:
        """The most recent blocked decisions, oldest first."""
        return [verdict for verdict, _ in self._blocked]

    def blocked_events(self) -> List[Dict[str, Any]]:
        """
        The audit fields (SPEC §9.3) of the most recent blocked decisions,
        oldest first.
        """
        return [fields for _, fields in self._blocked]

    def decide_now(self, request: ProxyRequest) -> Optional[Verdict]:
        """
        The synchronous path of L{check}: the verdict of C{request}, with its
        one audit event, when it needs neither the decider nor a resolution
        (a refusal, an IP literal, a unix socket); C{None} when it needs
        either, and then nothing is recorded: call L{check}.
        """
        started = self._clock.seconds() if self._observe is not None else 0.0
        policy = self.policy.for_client(request.client_identity)
        final = self._current().answer(policy, request, self._asks(policy), self._settled)
        return None if final is None else self._timed(self._record(final), started)

    def _timed(self, verdict: Verdict, started: float) -> Verdict:
        """C{verdict}, its decision time observed when metrics are kept."""
        if self._observe is not None:
            self._observe(self._clock.seconds() - started)
        return verdict

    def _asks(self, policy: Policy) -> bool:
        """An allowlist miss goes to the decider under C{policy}."""
        return self.decider is not None and not policy.managed_allowed_domains_only

    def _current(self) -> _Verdicts:
        """The verdicts kept under the policy in force (none after a reload)."""
        verdicts = self._verdicts
        if verdicts.policy is not self.policy or verdicts.full:
            verdicts = self._verdicts = _Verdicts(self.policy)
        return verdicts

    def _decide(self, policy: Policy, request: ProxyRequest) -> Verdict:
        """L{decide} by C{policy} (in force, or a client's own), kept until a reload."""
        like = self._current().decided(policy, request, request.kind())
        return like if like.request is request else like.about(request)

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
        policy = self.policy.for_client(request.client_identity)
        verdict = self._decide(policy, request)
        decider = self.decider
        if verdict.reason is Reason.NOT_ALLOWED and self._asks(policy):
            assert decider is not None
            asked = NetworkPolicyRequest(
                protocol=request.protocol,
                host=verdict.host,
                port=request.port,
                client_addr=request.client,
                method=request.method,
                command=request.command,
                client_identity=request.client_identity,
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
        settled = self._settled(policy, verdict)
        if settled is not None:
            return defer.succeed(self._record(settled))
        request = verdict.request
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

    def _settled(self, policy: Policy, verdict: Verdict) -> Optional[Verdict]:
        """
        What C{verdict} comes to when it needs no resolution: an IP literal's
        one address meets the ranges like an answer; a refusal, or a unix
        socket, stands, unless it reaches the proxy itself. C{None} for an
        allowed name.
        """
        if verdict.allowed and verdict.addresses:
            return self._vetted(policy, verdict, list(verdict.addresses))
        if not verdict.allowed or verdict.request.unix_socket is not None:
            return self._notSelf(verdict)
        return None

    def refuse(self, request: ProxyRequest, reason: Reason) -> Verdict:
        """
        Deny C{request} for a reason of the proxy's own state (a limit
        reached, a proxy loop, failed client authentication), without
        consulting the policy:
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
        verdict = decide_association(self.policy.for_client(request.client_identity), request)
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
        return defer.succeed(self.decide_pinned(request, tunnel))

    def decide_pinned(self, request: ProxyRequest, tunnel: Verdict) -> Verdict:
        """
        L{check_pinned}, whose answer is always synchronous.
        """
        started = self._clock.seconds() if self._observe is not None else 0.0
        policy = self.policy.for_client(request.client_identity)
        verdict = self._decide(policy, request)
        if verdict.reason is Reason.NOT_ALLOWED and tunnel.override:
            verdict = admit(policy, request, verdict.host, override=True)
        if verdict.allowed:
            return self._timed(self._vet(policy, verdict, list(tunnel.addresses)), started)
        return self._timed(self._record(verdict), started)

    def _vet(self, policy: Policy, verdict: Verdict, found: List[IPAddress]) -> Verdict:
        """
        Record C{verdict} with the addresses C{found} vetted (SPEC §4.1 step
        7, §5.3), never one of the proxy's own.
        """
        return self._record(self._vetted(policy, verdict, found))

    def _vetted(self, policy: Policy, verdict: Verdict, found: List[IPAddress]) -> Verdict:
        vetted = vet(policy, verdict, found)
        return self._notSelf(vetted) if vetted.allowed else vetted

    def _notSelf(self, verdict: Verdict) -> Verdict:
        """
        C{verdict}, refused C{not_allowed_local} when one of its vetted
        addresses is one of the proxy's own listening addresses.
        """
        return refused(verdict, Reason.NOT_ALLOWED_LOCAL) if self._own.includes(verdict) else verdict

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
