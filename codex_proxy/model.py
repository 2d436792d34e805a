"""
Frozen values shared by every ring of the package.

Nothing here does I/O or knows about Twisted: a L{ProxyRequest} is what a
listener extracted from the wire, a L{Verdict} is what the policy said about
it.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Callable, Dict, Generic, Optional, Tuple, TypeVar, Union

import attrs

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class Protocol(str, enum.Enum):
    """
    The C{network.transport.protocol} of a decision (SPEC §4.2, §9.2).
    """

    HTTP = "http"
    HTTPS = "https"
    HTTPS_CONNECT = "https_connect"
    SOCKS5_TCP = "socks5_tcp"
    SOCKS5_UDP = "socks5_udp"
    DNS = "dns"


class Mode(str, enum.Enum):
    FULL = "full"
    LIMITED = "limited"


class Reason(str, enum.Enum):
    """
    Why a request was blocked or failed; the keys of L{codex_proxy.errors}.
    """

    # Policy outcomes (SPEC §4.1/§4.2).
    PROXY_DISABLED = "proxy_disabled"
    INVALID_HOST = "invalid_host"
    DENIED = "denied"
    NOT_ALLOWED_LOCAL = "not_allowed_local"
    NOT_ALLOWED = "not_allowed"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MITM_REQUIRED = "mitm_required"
    POLICY_DENIED = "policy_denied"
    UNIX_SOCKET_NOT_ALLOWED = "unix_socket_not_allowed"
    # The proxy's own state (SPEC §2.6): limits.max_connections or
    # limits.max_udp_associations reached.
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TOO_MANY_UDP_ASSOCIATIONS = "too_many_udp_associations"
    # Client authentication (SPEC §11): missing or wrong credentials, or
    # limits.max_connections_per_client reached.
    CLIENT_AUTH_FAILED = "client_auth_failed"
    TOO_MANY_CLIENT_CONNECTIONS = "too_many_client_connections"
    # A request that already passed through this proxy (SPEC §4.2b).
    PROXY_LOOP = "proxy_loop"
    # Transport outcomes (SPEC §4.3).
    UPSTREAM_DNS_FAILED = "upstream_dns_failed"
    UPSTREAM_CONNECT_FAILED = "upstream_connect_failed"
    UPSTREAM_REFUSED = "upstream_refused"
    UPSTREAM_TLS_FAILED = "upstream_tls_failed"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_BAD_RESPONSE = "upstream_bad_response"
    # A secret's placeholder on its way where the secret may not go (SPEC §12).
    SECRET_MISUSE = "secret_misuse"


class Decision(str, enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


class Source(str, enum.Enum):
    BASELINE_POLICY = "baseline_policy"
    MODE_GUARD = "mode_guard"
    PROXY_STATE = "proxy_state"
    DECIDER = "decider"


#: Methods a limited-mode (read-only) proxy lets through (SPEC §4.4).
READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@attrs.frozen(cache_hash=True)  # a key of the verdict cache, looked up per request
class ProxyRequest:
    """
    One thing to decide: a plain request, a tunnel, a SOCKS connect or a
    datagram.

    @ivar host: the host as the client spelled it (not yet normalised).
    @ivar method: the HTTP method, or C{None} for SOCKS.
    @ivar has_body: the request carries a body (limited mode blocks it).
    @ivar upgrade: the request asks for a protocol upgrade.
    @ivar override_methods: the methods the request names in place of its
        own, upper-cased: method-override header fields and C{_method}
        query parameters (limited mode blocks any but a read-only one).
    @ivar client: the client's address as C{"ip:port"}, or C{None}.
    @ivar command: the client identity (SOCKS username) or other context.
    @ivar client_identity: the authenticated client name (SPEC §11), or the
        SOCKS5 username when no clients are configured; C{None} when
        anonymous. Decisions use that client's policy.
    @ivar unix_socket: the symlink-resolved path of an C{x-unix-socket}
        request (SPEC §8); such a request is judged by socket path, never by
        the domain lists, and C{host}/C{port} are C{"unix-socket"}/C{0}.
    @ivar secrets: the names of the secrets whose placeholders the request
        header values carry (SPEC §12).
    """

    protocol: Protocol
    host: str
    port: int
    method: Optional[str] = None
    has_body: bool = False
    upgrade: bool = False
    override_methods: Tuple[str, ...] = ()
    client: Optional[str] = None
    command: Optional[str] = None
    unix_socket: Optional[str] = None
    secrets: Tuple[str, ...] = ()
    client_identity: Optional[str] = None

    def kind(self) -> Tuple[object, ...]:
        """
        All of the request but its client's address, as a key: what a
        decision may read (L{codex_proxy.policy.decide} does not read
        C{client}), so requests of one kind from different connections
        share it.
        """
        return (
            self.protocol, self.host, self.port, self.method, self.has_body, self.upgrade,
            self.override_methods, self.command, self.unix_socket, self.secrets, self.client_identity,
        )


#: The C{host} of every unix-socket request, as audited (SPEC §8).
UNIX_SOCKET_HOST = "unix-socket"


@attrs.frozen
class Verdict:
    """
    The outcome of a decision.

    @ivar host: the normalised host (the raw one when it could not be
        normalised).
    @ivar reason: C{None} when allowed, else why not.
    @ivar addresses: when allowed, the vetted addresses to dial, in order.
        Empty when allowed but not yet resolved (the synchronous core never
        resolves).
    @ivar intercept: the CONNECT is to be terminated by MITM (SPEC §6).
    @ivar override: a decider allowed an allowlist miss.
    @ivar matched: the pattern text that decided, if any.
    @ivar detail: the policy decider's own reason for a deny or ask (kept in
        the blocked history; the wire and the audit event say
        C{policy_denied}).
    @ivar secret: the name of the secret whose placeholder was refused
        (C{secret_misuse}); never its value.
    """

    request: ProxyRequest
    host: str
    decision: Decision
    source: Source
    reason: Optional[Reason] = None
    addresses: Tuple[IPAddress, ...] = ()
    intercept: bool = False
    override: bool = False
    matched: Optional[str] = None
    detail: Optional[str] = None
    secret: Optional[str] = None
    #: The verdict this one is a copy of (L{about}), decided for the first
    #: request of its kind; C{None} when it is its own. Only L{about} sets
    #: it: a verdict made any other way (C{attrs.evolve} too) may differ
    #: from the one it came from, and is its own.
    original: Optional[Verdict] = attrs.field(default=None, init=False, eq=False, repr=False)
    #: The decision is C{ALLOW}: read several times per request, so kept
    #: rather than worked out each time.
    allowed: bool = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "allowed", self.decision is Decision.ALLOW)

    @property
    def port(self) -> int:
        return self.request.port

    def about(self, request: ProxyRequest) -> Verdict:
        """
        This verdict, for C{request} (of the same L{kind <ProxyRequest.kind>}):
        the copy a connection gets of a decision made once. C{attrs.evolve}
        does the same at about three times the cost, and this runs once per
        new connection.
        """
        copy = Verdict(
            request, self.host, self.decision, self.source, self.reason, self.addresses,
            self.intercept, self.override, self.matched, self.detail, self.secret,
        )
        object.__setattr__(copy, "original", self.original or self)
        return copy


_T = TypeVar("_T")


class PerVerdict(Generic[_T]):
    """
    C{derive} of recent verdicts, worked out once per decision: the policy
    service answers a repeated request with the same verdict object, and a
    request of a kind decided before (another connection's) with a copy of
    that kind's verdict (L{Verdict.about}), so what follows from one (its
    audit fields, its route) is kept by the identity of the verdict it was
    copied from, holding that verdict so the identity stays its own.
    C{derive} is given that verdict: it may read of its request only what
    every request of the kind shares (not C{client}). Forgets everything
    once it holds C{size} (the verdict cache's size).
    """

    def __init__(self, derive: Callable[[Verdict], _T], size: int = 256) -> None:
        self._derive = derive
        self._size = size
        self._known: Dict[int, Tuple[Verdict, _T]] = {}

    def __call__(self, verdict: Verdict) -> _T:
        verdict = verdict.original or verdict
        known = self._known.get(id(verdict))
        if known is not None and known[0] is verdict:
            return known[1]
        if len(self._known) >= self._size:
            self._known.clear()
        value = self._derive(verdict)
        self._known[id(verdict)] = (verdict, value)
        return value
