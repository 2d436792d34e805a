"""
The synchronous policy decision: SPEC §4.1 steps 1 to 6 and the limited-mode
guard of SPEC §4.4.

L{decide} is total and pure. Resolution (step 7), the decider and auditing
are the policy service's job; this module only says what the configuration
alone says, including about the addresses a host resolved to (L{vet});
L{policy_from_config} compiles a loaded config into the L{Policy} it reads.
"""

from __future__ import annotations

import functools
from typing import Callable, FrozenSet, Iterable, Mapping, Optional, Sequence, Tuple

import attrs

from codex_proxy.addresses import AddressRanges, is_local_name, is_public, parse_ip_literal
from codex_proxy.clients import Client, Credentials, stricter
from codex_proxy.config import ProxyConfig
from codex_proxy.domains import DomainSet, InvalidHost, normalize_host, parse_pattern
from codex_proxy.model import (
    READ_ONLY_METHODS,
    Decision,
    IPAddress,
    Mode,
    Protocol,
    ProxyRequest,
    Reason,
    Source,
    Verdict,
)

_MAX_PORT = 65535

#: Protocols whose host arrives as a field of its own: a port or surrounding
#: space in it make it no host name (SPEC §4.3).
_BARE_HOSTS = frozenset({Protocol.SOCKS5_TCP, Protocol.SOCKS5_UDP})



@attrs.frozen
class Policy:
    """
    Everything the synchronous decision needs, with patterns compiled.

    @ivar managed_allowed_domains_only: allowlist misses are final: the
        allowlist is managed (SPEC §2.4), so no decider may lift a miss.
    @ivar ranges: C{allowed_ranges} and C{denied_ranges} (SPEC §5.3).
    @ivar secrets: each secret's name and the hosts it may go to (SPEC §12).
    @ivar secret_hosts: every secret's hosts: tunnels there are intercepted.
    @ivar plaintext_secrets: placeholders may go in plain C{http://}.
    @ivar credentials: the clients' tokens (SPEC §11).
    @ivar clients: client name -> that client's own compiled policy.
    """

    enabled: bool
    mode: Mode
    mitm: bool
    allow_local_binding: bool
    allowed: DomainSet
    denied: DomainSet
    managed_allowed_domains_only: bool = False
    unix_sockets: FrozenSet[str] = frozenset()
    all_unix_sockets: bool = False
    ranges: AddressRanges = AddressRanges()
    secrets: Tuple[Tuple[str, DomainSet], ...] = ()
    secret_hosts: DomainSet = DomainSet(())
    plaintext_secrets: bool = False
    credentials: Credentials = Credentials()
    clients: Mapping[str, Policy] = attrs.field(factory=dict, hash=False)

    def for_client(self, identity: Optional[str]) -> Policy:
        """
        The policy of the authenticated client C{identity}; the base policy
        for anonymous connections and for names that are only labels (a
        SOCKS5 username when no clients are configured).
        """
        if identity is None:
            return self
        return self.clients.get(identity, self)

    @classmethod
    def build(
        cls,
        *,
        enabled: bool = True,
        mode: Mode = Mode.FULL,
        mitm: bool = False,
        allow_local_binding: bool = False,
        allowed: Iterable[str] = (),
        denied: Iterable[str] = (),
        managed_allowed_domains_only: bool = False,
        unix_sockets: Iterable[str] = (),
        all_unix_sockets: bool = False,
        allowed_ranges: Iterable[str] = (),
        denied_ranges: Iterable[str] = (),
        secrets: Iterable[Tuple[str, Iterable[str]]] = (),
        plaintext_secrets: bool = False,
    ) -> Policy:
        """
        Compile pattern strings into a policy. C{unix_sockets} are compared
        as given: the caller resolves their symlinks first (that is I/O).
        C{secrets} pairs each secret's name with its host patterns.

        @raise codex_proxy.domains.PatternError: a pattern is malformed.
        @raise ValueError: an address range is malformed.
        """
        bound = tuple(
            (name, DomainSet(parse_pattern(text) for text in hosts)) for name, hosts in secrets
        )
        return cls(
            enabled=enabled,
            mode=mode,
            mitm=mitm,
            allow_local_binding=allow_local_binding,
            allowed=DomainSet(parse_pattern(text) for text in allowed),
            denied=DomainSet(parse_pattern(text, deny=True) for text in denied),
            managed_allowed_domains_only=managed_allowed_domains_only,
            unix_sockets=frozenset(unix_sockets),
            all_unix_sockets=all_unix_sockets,
            ranges=AddressRanges.build(allowed_ranges, denied_ranges),
            secrets=bound,
            secret_hosts=DomainSet(pattern for _, hosts in bound for pattern in hosts),
            plaintext_secrets=plaintext_secrets,
        )


def policy_from_config(config: ProxyConfig, realpath: Callable[[str], str]) -> Policy:
    """
    Compile the policy of an effective config (once per load, never per
    request).

    @param realpath: resolves the symlinks of an allowed socket path
        (C{os.path.realpath}; the requested path is resolved per request,
        SPEC §8). Passed in because it reads the file system.
    """
    sockets = [realpath(path) for path in config.allow_unix_sockets]

    def compiled(own: ProxyConfig) -> Policy:
        return Policy.build(
            enabled=own.enabled,
            mode=own.mode,
            mitm=own.mitm,
            allow_local_binding=own.allow_local_binding,
            allowed=own.allowed_domains,
            denied=own.denied_domains,
            managed_allowed_domains_only=own.managed_allowed_domains_only,
            unix_sockets=sockets,
            all_unix_sockets=own.dangerously_allow_all_unix_sockets,
            allowed_ranges=own.allowed_ranges,
            denied_ranges=own.denied_ranges,
            secrets=[(secret.name, secret.hosts) for secret in own.secrets],
            plaintext_secrets=own.dangerously_allow_plaintext_secrets,
        )

    return attrs.evolve(
        compiled(config),
        credentials=Credentials.of(config.clients, config.require_client_auth),
        # Each client's own policy (SPEC §11), compiled once per load too.
        clients={client.name: compiled(client_config(config, client)) for client in config.clients},
    )


def client_config(config: ProxyConfig, client: Client) -> ProxyConfig:
    """
    The effective config of one client (SPEC §11) of the effective
    C{config}: base ∪ client allow (no client allow under a managed
    allowlist), base ∪ client deny (deny wins), the stricter mode; managed
    ceilings are already in C{config}.
    """
    extra = () if config.managed_allowed_domains_only else client.allowed_domains
    denied = dict.fromkeys((*config.denied_domains, *client.denied_domains))
    allowed = dict.fromkeys((*config.allowed_domains, *extra))
    return attrs.evolve(
        config,
        mode=stricter(config.mode, client.mode),
        allowed_domains=tuple(text for text in allowed if text not in denied),
        denied_domains=tuple(denied),
        pattern_sources={**client.pattern_sources, **config.pattern_sources},
    )



@functools.lru_cache(maxsize=4096)
def is_local_target(host: str) -> bool:
    """
    Whether the normalised C{host} names this machine or a private network
    by itself: C{localhost} names and non-public IP literals (SPEC §5.1).
    """
    if is_local_name(host):
        return True
    ip = parse_ip_literal(host)
    return ip is not None and not is_public(ip)


def decide(policy: Policy, request: ProxyRequest) -> Verdict:
    """
    Judge C{request} against C{policy}, never raising. An allowed verdict
    carries the address to dial when the host is an IP literal, and no
    address for a name (the caller resolves and vets it).
    """
    host = _normalize(request)
    if not policy.enabled:
        return _deny(request, host, Reason.PROXY_DISABLED, Source.PROXY_STATE)
    if request.unix_socket is not None:
        return decide_unix_socket(policy, request)
    # A DNS lookup names no port (port 0): only patterns for every port
    # decide it.
    dns = request.protocol is Protocol.DNS
    if host is None or not (dns or 1 <= request.port <= _MAX_PORT):
        return _deny(request, host, Reason.INVALID_HOST)
    port = None if dns else request.port
    denied = policy.denied.match(host, port)
    if denied is not None:
        return _deny(request, host, Reason.DENIED, matched=denied.text)
    if (
        not policy.allow_local_binding
        and is_local_target(host)
        and not policy.allowed.exact(host, port)
        and not _in_allowed_range(policy, host)
    ):
        return _deny(request, host, Reason.NOT_ALLOWED_LOCAL)
    allowed = policy.allowed.match(host, port)
    if allowed is None:
        return _deny(request, host, Reason.NOT_ALLOWED)
    return admit(policy, request, host, matched=allowed.text)


def _in_allowed_range(policy: Policy, host: str) -> bool:
    """
    Whether the normalised C{host} is an IP literal that C{allowed_ranges}
    keeps from being refused as non-public (SPEC §5.3); the allowlist
    still decides about it.
    """
    ip = parse_ip_literal(host)
    return ip is not None and policy.ranges.admits(ip)


def vet(policy: Policy, verdict: Verdict, found: Sequence[IPAddress]) -> Verdict:
    """
    SPEC §4.1 step 7 for an allowed C{verdict} whose host is (or resolved
    to) the addresses C{found}: any of them in C{denied_ranges} is
    C{denied}; any non-public one outside C{allowed_ranges} refuses the
    whole answer C{not_allowed_local}, unless local binding is allowed or
    the host is a local target that passed step 4 (an exactly allowlisted
    C{localhost} may resolve locally). Otherwise C{verdict} carries
    C{found} as the addresses to dial.
    """
    ranges = policy.ranges
    for ip in found:
        net = ranges.denying(ip)
        if net is not None:
            return refused(verdict, Reason.DENIED, matched=str(net))
    if not (policy.allow_local_binding or is_local_target(verdict.host)):
        if not all(is_public(ip) or ranges.admits(ip) for ip in found):
            return refused(verdict, Reason.NOT_ALLOWED_LOCAL)
    return attrs.evolve(verdict, addresses=tuple(found))


def refused(verdict: Verdict, reason: Reason, *, matched: Optional[str] = None) -> Verdict:
    """
    C{verdict} refused by the baseline policy for C{reason} after it was
    allowed, with no address to dial; C{matched} names the range that
    decided, if one did.
    """
    return attrs.evolve(
        verdict,
        decision=Decision.DENY,
        source=Source.BASELINE_POLICY,
        reason=reason,
        addresses=(),
        intercept=False,
        override=False,
        matched=verdict.matched if matched is None else matched,
    )


def _normalize(request: ProxyRequest) -> Optional[str]:
    """
    The normalised host of C{request}, or C{None} when it is invalid.
    """
    raw = request.host
    try:
        host = normalize_host(raw)
    except InvalidHost:
        return None
    if request.protocol in _BARE_HOSTS and (
        raw != raw.strip()
        or (raw.startswith("[") and not raw.endswith("]"))
        or (":" in raw and ":" not in host)
    ):
        # A port after a name, an IPv4 address or an IPv6 one in brackets:
        # only an IPv6 literal keeps its colons through normalisation.
        return None
    return host


def decide_unix_socket(policy: Policy, request: ProxyRequest) -> Verdict:
    """
    Judge an C{x-unix-socket} request (SPEC §8): its symlink-resolved path
    must be absolute and allowed exactly (or every socket allowed); the
    domain lists are not consulted, the limited-mode guard is.
    """
    path = request.unix_socket
    assert path is not None
    host = request.host
    if not (
        path.startswith("/") and (policy.all_unix_sockets or path in policy.unix_sockets)
    ):
        return _deny(request, host, Reason.UNIX_SOCKET_NOT_ALLOWED)
    misused = secret_misuse(policy, request, host)
    if misused is not None:
        return misused
    refusal = mode_guard(policy, request)
    if refusal is not None:
        return _deny(request, host, refusal, Source.MODE_GUARD)
    return Verdict(
        request=request, host=host, decision=Decision.ALLOW, source=Source.BASELINE_POLICY
    )


def decide_association(policy: Policy, request: ProxyRequest) -> Verdict:
    """
    Judge a SOCKS5 UDP ASSOCIATE (SPEC §6a): refused by a disabled proxy
    and in limited mode (SPEC §4.4). Its C{host} and C{port} are the
    client's own declared address, judged by nothing here: each destination
    of the association is decided per datagram.
    """
    if not policy.enabled:
        return _deny(request, None, Reason.PROXY_DISABLED, Source.PROXY_STATE)
    refusal = mode_guard(policy, request)
    if refusal is not None:
        return _deny(request, None, refusal, Source.MODE_GUARD)
    return Verdict(
        request=request,
        host=request.host,
        decision=Decision.ALLOW,
        source=Source.BASELINE_POLICY,
    )


def admit(
    policy: Policy,
    request: ProxyRequest,
    host: str,
    *,
    matched: Optional[str] = None,
    override: bool = False,
) -> Verdict:
    """
    The verdict for a request whose normalised C{host} passed the host
    checks (or that a decider let through, C{override}): the mode guard of
    SPEC §4.4 (after the secrets' rules of SPEC §12), then allow,
    intercepting a limited-mode CONNECT and one to a secret's host.
    """
    misused = secret_misuse(policy, request, host)
    if misused is not None:
        return misused
    bound = _secret_tunnel(policy, request, host)
    refusal = None if bound else mode_guard(policy, request)
    if refusal is not None:
        return _deny(request, host, refusal, Source.MODE_GUARD, matched=matched)
    ip = parse_ip_literal(host)
    return Verdict(
        request=request,
        host=host,
        decision=Decision.ALLOW,
        source=Source.BASELINE_POLICY,
        addresses=() if ip is None else (ip,),
        intercept=bound
        or (
            policy.mode is Mode.LIMITED
            and request.protocol in (Protocol.HTTPS_CONNECT, Protocol.SOCKS5_TCP)
        ),
        override=override,
        matched=matched,
    )


#: The one SOCKS5 CONNECT port limited mode intercepts (SPEC §6).
HTTPS_PORT = 443


def _secret_tunnel(policy: Policy, request: ProxyRequest, host: str) -> bool:
    """
    Whether C{request} is a tunnel to a secret's host, intercepted in any
    mode (SPEC §12): a CONNECT, or a SOCKS5 CONNECT to port 443 by name (the
    one a TLS client's SNI can match; any other SOCKS5 tunnel stays opaque).
    """
    if request.protocol is Protocol.SOCKS5_TCP:
        if request.port != HTTPS_PORT or parse_ip_literal(request.host) is not None:
            return False
    elif request.protocol is not Protocol.HTTPS_CONNECT:
        return False
    return policy.secret_hosts.match(host) is not None


def secret_misuse(policy: Policy, request: ProxyRequest, host: str) -> Optional[Verdict]:
    """
    The refusal of a request carrying the placeholder of a secret that may
    not go there (SPEC §12): to a host outside the secret's hosts, or in
    plain C{http://} unless C{dangerously_allow_plaintext_secrets}; else
    C{None}. Names no configured secret calls its own are no placeholders.
    """
    if not request.secrets:
        return None
    plain = request.protocol is Protocol.HTTP and not policy.plaintext_secrets
    for name, hosts in policy.secrets:
        if name in request.secrets and (plain or hosts.match(host) is None):
            return attrs.evolve(_deny(request, host, Reason.SECRET_MISUSE), secret=name)
    return None


def mode_guard(policy: Policy, request: ProxyRequest) -> Optional[Reason]:
    """
    Why limited mode refuses C{request}, or C{None} (SPEC §4.4). Read-only
    means read-only: a body, an upgrade or a method override naming any
    other method is refused even on a GET.
    """
    if policy.mode is not Mode.LIMITED or request.protocol is Protocol.DNS:
        # A name lookup reads; it writes nothing anywhere (SPEC §14.2).
        return None
    if request.protocol is Protocol.SOCKS5_TCP:
        # HTTPS through SOCKS5 is intercepted like a CONNECT (SPEC §6); any
        # other port carries bytes nobody can method-check. Only by name: a
        # client that gave only an address names its host in the SNI alone,
        # which must equal the tunnel's host, so no handshake could succeed
        # (socks5h:// clients send the name).
        if policy.mitm and request.port == HTTPS_PORT and parse_ip_literal(request.host) is None:
            return None
        return Reason.METHOD_NOT_ALLOWED
    if request.protocol is Protocol.SOCKS5_UDP:
        return Reason.METHOD_NOT_ALLOWED
    if request.protocol is Protocol.HTTPS_CONNECT:
        return None if policy.mitm else Reason.MITM_REQUIRED
    if (
        request.method not in READ_ONLY_METHODS
        or request.has_body
        or request.upgrade
        or not READ_ONLY_METHODS.issuperset(request.override_methods)
    ):
        return Reason.METHOD_NOT_ALLOWED
    return None


def _deny(
    request: ProxyRequest,
    host: Optional[str],
    reason: Reason,
    source: Source = Source.BASELINE_POLICY,
    *,
    matched: Optional[str] = None,
) -> Verdict:
    """
    A deny verdict; C{host} is C{None} when the raw host was invalid.
    """
    return Verdict(
        request=request,
        host=request.host if host is None else host,
        decision=Decision.DENY,
        source=source,
        reason=reason,
        matched=matched,
    )
