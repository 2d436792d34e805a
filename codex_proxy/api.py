"""
The embedding API (SPEC §9.1): build a proxy from a config, run it inside any
Twisted program, hand its address to child processes, stop it.

    proxy = yield NetworkProxy.builder().config(cfg).http_addr("127.0.0.1:0").build()
    handle = yield proxy.run()
    ... proxy.env() ...
    yield handle.shutdown()

L{ProxyService} wraps the same cycle as an C{IService} for C{.tac} files and
C{twistd codexproxy}: this module holds the one copy of listener binding.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import attrs
from twisted.application.service import Service
from twisted.internet import defer, endpoints, threads
from twisted.internet.interfaces import IHostnameResolver, IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from codex_proxy import _httphead
from codex_proxy.audit import Auditor, Sink
from codex_proxy.ca import (
    BUNDLE_FILE,
    CAError,
    CertificateAuthority,
    load_or_create_ca,
    system_roots_file,
    write_bundle,
)
from codex_proxy.parents import ParentProxies, from_environ
from codex_proxy.childenv import child_env
from codex_proxy.config import (
    ConfigError,
    ListenAddress,
    ProxyConfig,
    codex_home,
    parse_listen_address,
)
from codex_proxy.decider import Decider
from codex_proxy.descriptors import fit_max_connections
from codex_proxy.errors import ProxyError
from codex_proxy.httpproxy import HTTPProxyFactory
from codex_proxy.connections import Connections
from codex_proxy.mitm import Interceptor, OriginTLS, UpstreamTrust, trust_files
from codex_proxy.model import Verdict
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.policystate import PolicyState
from codex_proxy.rules import SourcePaths, Sources, effective_config
from codex_proxy.socks5 import SOCKS5Factory
from codex_proxy.upstream import Upstream

_log = Logger()

class ListenError(ProxyError):
    """
    A listener could not be bound; the message names the address and key.
    """


class InterceptionError(ProxyError):
    """
    HTTPS interception was asked for but its CA or trust store cannot be
    used; the proxy does not start (fail closed).
    """


def policy_from_config(config: ProxyConfig) -> Policy:
    """
    Compile the policy of a config (once per load, never per request).
    With C{mitm = true} the proxy loads its CA before it listens, or fails.
    """
    return Policy.build(
        enabled=config.enabled,
        mode=config.mode,
        mitm=config.mitm,
        allow_local_binding=config.allow_local_binding,
        allowed=config.allowed_domains,
        denied=config.denied_domains,
        managed_allowed_domains_only=config.managed_allowed_domains_only,
        # Symlinks of the allowed sockets are resolved once per load (the
        # requested path is resolved per request, SPEC §8).
        unix_sockets=[os.path.realpath(path) for path in config.allow_unix_sockets],
        all_unix_sockets=config.dangerously_allow_all_unix_sockets,
    )


@attrs.frozen
class Interception:
    """
    What HTTPS interception needs, loaded once at start (SPEC §6): the CA,
    the trust store for upstream legs, and the client bundle's path.
    """

    ca: CertificateAuthority
    trust: UpstreamTrust
    bundle: str


def load_interception(environ: Mapping[str, str] = os.environ) -> Interception:
    """
    Load or create the CA under C{$CODEX_HOME/proxy/}, write the client
    bundle (system roots + our CA) next to it, and load the upstream trust
    (system roots + C{SSL_CERT_FILE}, never our CA). Blocking file I/O, done
    once before listening.

    @raise CAError: the CA files are unsafe or unusable (fail closed).
    @raise ConfigError: C{CODEX_HOME}/C{HOME} cannot be found.
    @raise OSError: a file could not be read or written.
    """
    directory = os.path.join(codex_home(environ), "proxy")
    ca = load_or_create_ca(directory, time.time)
    roots = system_roots_file()
    bundle = os.path.join(directory, BUNDLE_FILE)
    write_bundle(ca, bundle, roots)
    trust = UpstreamTrust.from_files(trust_files(environ, roots), exclude=ca.cert)
    return Interception(ca, trust, bundle)


def parents_from_config(
    config: ProxyConfig, environ: Mapping[str, str]
) -> Optional[ParentProxies]:
    """
    The parent proxies of the proxy's own environment, read once at start,
    or C{None} when C{allow_upstream_proxy} is off (SPEC §7).
    """
    return from_environ(environ) if config.allow_upstream_proxy else None


def head_limits(config: ProxyConfig) -> _httphead.HeadLimits:
    limits = config.limits
    return _httphead.HeadLimits(
        max_request_line_bytes=limits.max_request_line_bytes,
        max_header_bytes=limits.max_header_bytes,
        max_header_fields=limits.max_header_fields,
    )


#: The listen queue: a burst of connections (hundreds of clients starting
#: at once) waits in the kernel instead of retrying dropped SYNs a second
#: later, as it would with Twisted's default of 50.
LISTEN_BACKLOG = 1024


def _endpoint(reactor: Any, address: ListenAddress) -> Any:
    if ":" in address.host:
        return endpoints.TCP6ServerEndpoint(
            reactor, address.port, backlog=LISTEN_BACKLOG, interface=address.host
        )
    return endpoints.TCP4ServerEndpoint(
        reactor, address.port, backlog=LISTEN_BACKLOG, interface=address.host
    )


def _bound(port: IListeningPort) -> str:
    host = port.getHost()
    return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"


@attrs.frozen
class ProxyHandle:
    """
    A running proxy: the addresses its listeners actually bound (C{None}
    for a listener that is off), and L{shutdown}.
    """

    http_addr: Optional[str]
    socks_addr: Optional[str]
    _proxy: "NetworkProxy" = attrs.field(repr=False)

    def shutdown(self) -> defer.Deferred[None]:
        """
        Stop listening and close every client connection and tunnel; fires
        once all of them are gone.
        """
        return self._proxy._shutdown()


class NetworkProxyBuilder:
    """
    Collects what a L{NetworkProxy} is made of; every setter returns the
    builder so calls chain.
    """

    def __init__(self) -> None:
        self._config = ProxyConfig.default()
        self._listens: Dict[str, ListenAddress] = {}
        self._decider: Optional[Decider] = None
        self._metadata: Dict[str, str] = {}
        self._sinks: List[Sink] = []
        self._reactor: Any = None
        self._resolver: Optional[IHostnameResolver] = None
        self._sources: Optional[Sources] = None
        self._paths = SourcePaths()
        self._environ: Mapping[str, str] = os.environ
        self._interception: Optional[Interception] = None

    def config(self, config: ProxyConfig) -> NetworkProxyBuilder:
        self._config = config
        return self

    def http_addr(self, address: str) -> NetworkProxyBuilder:
        """
        Listen for HTTP proxy clients on C{address} (C{"127.0.0.1:0"} for an
        ephemeral port) instead of the config's C{proxy_url}.

        @raise ValueError: C{address} is malformed.
        """
        self._listens["http_listen"] = parse_listen_address(address)
        return self

    def socks_addr(self, address: str) -> NetworkProxyBuilder:
        """
        Like L{http_addr}, for the SOCKS5 listener (C{socks_url}).
        """
        self._listens["socks_listen"] = parse_listen_address(address)
        return self

    def policy_decider(self, decider: Decider) -> NetworkProxyBuilder:
        """
        Consult C{decider} for allowlist misses (SPEC §9.2).
        """
        self._decider = decider
        return self

    def audit_metadata(self, metadata: Mapping[str, str]) -> NetworkProxyBuilder:
        """
        Add these fields (C{conversation.id}, C{app.version},
        C{user.account_id}) to every audit event.
        """
        self._metadata.update(metadata)
        return self

    def audit_sink(self, sink: Sink) -> NetworkProxyBuilder:
        """
        Also hand every audit event's fields to C{sink} (a
        L{codex_proxy.audit.JSONLinesLog}, an exporter).
        """
        self._sinks.append(sink)
        return self

    def sources(self, sources: Sources, paths: SourcePaths) -> NetworkProxyBuilder:
        """
        Take the policy from these parsed files (config, managed requirements,
        remembered rules) instead of a bare config, so that L{NetworkProxy.reload}
        can re-read them and remembered approvals can be written back.
        """
        self._sources = sources
        self._paths = paths
        self._config = effective_config(sources)
        return self

    def environ(self, environ: Mapping[str, str]) -> NetworkProxyBuilder:
        """
        Read the upstream proxy variables (C{HTTP_PROXY}, C{NO_PROXY}, ...)
        from C{environ} instead of this process's environment (SPEC §7).
        """
        self._environ = environ
        return self

    def interception(self, interception: Interception) -> NetworkProxyBuilder:
        """
        Use this CA and trust store for HTTPS interception (C{mitm = true})
        instead of loading them from C{$CODEX_HOME/proxy/} at L{build}.
        """
        self._interception = interception
        return self

    def reactor(self, reactor: Any) -> NetworkProxyBuilder:
        """
        Use C{reactor} (TCP, time and name resolution) instead of the global one.
        """
        self._reactor = reactor
        return self

    def resolver(self, resolver: IHostnameResolver) -> NetworkProxyBuilder:
        """
        Resolve allowed names through C{resolver} instead of the reactor's
        (every answer is still vetted, SPEC §5.1): tests map names to chosen
        addresses, C{--resolve} pins names.
        """
        self._resolver = resolver
        return self

    def build(self) -> defer.Deferred[NetworkProxy]:
        """
        Fires with the L{NetworkProxy}, or fails with C{ValueError} when an
        address given here is not on loopback and the config does not allow
        that (nothing is replaced silently in code).
        """
        config = self._config
        unix = bool(config.allow_unix_sockets) or config.dangerously_allow_all_unix_sockets
        for field, address in self._listens.items():
            if not address.is_loopback and (
                unix or not config.dangerously_allow_non_loopback_proxy
            ):
                return defer.fail(
                    ValueError(
                        f"listener address {address} is not on loopback"
                        " (needs dangerously_allow_non_loopback_proxy and no unix sockets)"
                    )
                )
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        sources = self._sources or Sources(config)
        listens = self._listens
        interception = self._interception
        if config.mitm and interception is None:
            try:
                interception = load_interception(self._environ)
            except (CAError, ConfigError, OSError, ValueError) as e:
                return defer.fail(InterceptionError(f"mitm: {e}"))
        return defer.succeed(
            NetworkProxy(
                attrs.evolve(sources, config=attrs.evolve(sources.config, **listens)),
                self._paths,
                reactor,
                Auditor(reactor.seconds, self._metadata, self._sinks),
                self._decider,
                self._environ,
                interception,
                self._resolver,
            )
        )


class NetworkProxy:
    """
    One proxy: its policy service and, while running, its listeners.

    @ivar policy: the L{PolicyService} deciding every request.
    """

    def __init__(
        self,
        sources: Sources,
        paths: SourcePaths,
        reactor: Any,
        auditor: Auditor,
        decider: Optional[Decider] = None,
        environ: Mapping[str, str] = os.environ,
        interception: Optional[Interception] = None,
        resolver: Optional[IHostnameResolver] = None,
    ) -> None:
        config = effective_config(sources)
        self._interception = interception
        self._environ = environ
        self.parents = parents_from_config(config, environ)
        self._reactor = reactor
        self._connections = Connections(config.limits.max_connections)
        self._ports: List[IListeningPort] = []
        self._handle: Optional[ProxyHandle] = None
        self.policy = PolicyService(
            policy_from_config(config),
            resolver=resolver or reactor.nameResolver,
            clock=reactor,
            auditor=auditor,
            resolve_timeout=config.limits.connect_timeout_s,
            decider=decider,
            decider_timeout=config.limits.decider_timeout_s,
        )
        self._state = PolicyState(
            self.policy,
            sources,
            paths,
            compile=policy_from_config,
            run_in_thread=lambda f: threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), f
            ),
        )

    @staticmethod
    def builder() -> NetworkProxyBuilder:
        return NetworkProxyBuilder()

    @property
    def config(self) -> ProxyConfig:
        """
        The effective config in force (listener keys and limits as started).
        """
        return self._state.config

    def run(self) -> defer.Deferred[ProxyHandle]:
        """
        Bind the listeners of an enabled config (none of a disabled one).
        Fails with L{ListenError} when one cannot be bound, after releasing
        any already bound.
        """
        if self._handle is not None:
            return defer.fail(RuntimeError("this proxy is already running"))
        config = self.config
        for warning in config.warnings:
            _log.warn("{warning}", warning=warning)
        if self.parents is not None:
            for warning in self.parents.warnings:
                _log.warn("{warning}", warning=warning)
            for kind, parent in (("http", self.parents.http), ("https", self.parents.https)):
                if parent is not None:
                    _log.info(
                        "{kind} targets go through the upstream proxy {address}",
                        kind=kind,
                        address=f"{parent.scheme}://{parent.address}",
                    )
        bound: Dict[str, str] = {}
        if config.enabled:
            self._connections.max_clients = fit_max_connections(config.limits.max_connections)
        else:
            _log.info(
                "codex-proxy is disabled (enabled = false in {source}); no listener bound",
                source=config.source,
            )
        for name, key, address, factory in self._listeners():
            try:
                bound[name] = self._listen(key, address, factory)
            except ListenError:
                self._stopListening()
                return defer.fail()
            _log.info(
                "codex-proxy {name} proxy listening on {address}",
                name=name.upper(),
                address=bound[name],
            )
        self._handle = ProxyHandle(bound.get("http"), bound.get("socks"), self)
        return defer.succeed(self._handle)

    def _listeners(self) -> List[Tuple[str, str, ListenAddress, Factory]]:
        """
        What to bind: (name, config key, address, factory) per listener.
        """
        config = self.config
        if not config.enabled:
            return []
        reactor = self._reactor
        upstream = Upstream(
            reactor, config.limits.connect_timeout_s, self._connections, parents=self.parents
        )
        interceptor = self._interceptor()
        http = HTTPProxyFactory(
            self.policy,
            upstream,
            reactor,
            head_limits(config),
            tunnel_idle=config.limits.tunnel_idle_s,
            header_timeout=config.limits.header_timeout_s,
            keepalive_idle=config.limits.keepalive_idle_s,
            response_timeout=config.limits.response_timeout_s,
            connections=self._connections,
            mitm=interceptor,
            origin_tls=interceptor or self._originTLS(),
        )
        listeners: List[Tuple[str, str, ListenAddress, Factory]] = [
            ("http", "proxy_url", config.http_listen, http)
        ]
        if config.enable_socks5:
            socks = SOCKS5Factory(
                self.policy,
                upstream,
                reactor,
                config.limits,
                enable_udp=config.enable_socks5_udp,
                reactor=reactor,
                connections=self._connections,
            )
            listeners.append(("socks", "socks_url", config.socks_listen, socks))
        return listeners

    def _interceptor(self) -> Optional[Interceptor]:
        """
        The interceptor of a proxy with a CA; without one, an intercept
        verdict (possible only after a reload turned mitm on) is refused.
        """
        i = self._interception
        if i is None:
            return None
        return Interceptor(i.ca, i.trust, self._reactor.seconds)

    def _originTLS(self) -> Optional[OriginTLS]:
        """
        Client TLS for absolute-form C{https://} requests: the system roots
        plus C{SSL_CERT_FILE} (SPEC §7). A trust store that cannot be read
        leaves such requests failing with C{upstream-tls-failed}.
        """
        try:
            trust = UpstreamTrust.from_files(trust_files(self._environ, system_roots_file()))
        except ValueError as e:
            _log.warn("no trust store for https:// requests: {error}", error=str(e))
            return None
        return OriginTLS(trust)

    def _listen(self, key: str, address: ListenAddress, factory: Factory) -> str:
        result: List[Any] = []
        # TCP endpoints bind synchronously: the Deferred has fired on return.
        _endpoint(self._reactor, address).listen(factory).addBoth(result.append)
        (outcome,) = result
        if isinstance(outcome, Failure):
            raise ListenError(
                f"cannot listen on {address} ({key}): {outcome.getErrorMessage()}"
            )
        self._ports.append(outcome)
        return _bound(outcome)

    def _stopListening(self) -> defer.Deferred[Any]:
        ports, self._ports = self._ports, []
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in ports],
            consumeErrors=True,
        )

    def _shutdown(self) -> defer.Deferred[None]:
        self._handle = None
        stopped = self._stopListening()
        closed = self._connections.closeAll()
        return defer.gatherResults([stopped, closed], consumeErrors=True).addCallback(
            lambda _: None
        )

    def env(self) -> Dict[str, str]:
        """
        Variables for child processes (SPEC §10): the bound addresses while
        running, else the configured ones; with interception, the CA bundle.

        @raise codex_proxy.childenv.EnvError: the proxy is disabled, or a
            listener asks for an ephemeral port and is not bound yet.
        """
        handle = self._handle
        return child_env(
            self.config,
            http=handle.http_addr if handle is not None else None,
            socks=handle.socks_addr if handle is not None else None,
            ca_bundle=self._interception.bundle if self._interception is not None else None,
        )

    def blocked(self) -> List[Verdict]:
        """
        The last 200 blocked decisions, oldest first.
        """
        return self.policy.blocked()

    def reload(self, config: Optional[ProxyConfig] = None) -> defer.Deferred[bool]:
        """
        Decide new requests by a new policy; open tunnels stay as they are.

        Without C{config}, re-read the files the proxy was built from
        (config, requirements, remembered rules); with one, use it in place
        of the config file. Listener keys and limits cannot change on a
        running proxy: each changed one is logged and its old value kept.

        @return: a Deferred firing C{True} when the new policy is in force,
            C{False} when it was invalid (logged) and the old one kept.
        """
        if config is None:
            return self._state.reload()
        try:
            self._state.replace(config)
        except ConfigError as e:
            _log.error("policy reload failed, previous policy kept: {error}", error=str(e))
            return defer.succeed(False)
        return defer.succeed(True)

    def add_allowed_domain(self, pattern: str, persist: bool = False) -> defer.Deferred[None]:
        """
        Allow C{pattern} from now on (an approval), removing it from the
        denylist; with C{persist}, remember it in
        C{$CODEX_HOME/proxy/network-rules.toml} across restarts.

        @raise codex_proxy.rules.RuleError: invalid, or forbidden by managed
            requirements; nothing changed.
        """
        return self._state.add_allowed_domain(pattern, persist)

    def add_denied_domain(self, pattern: str, persist: bool = False) -> defer.Deferred[None]:
        """
        Deny C{pattern} from now on, removing it from the allowlist; see
        L{add_allowed_domain}.
        """
        return self._state.add_denied_domain(pattern, persist)


class ProxyService(Service):
    """
    Runs a L{NetworkProxy} as an C{IService}: bound on start, shut down
    (connections included) on stop. A listener that cannot be bound stops
    start-up with one line on stderr and exit status 1.

    @ivar proxy: the proxy, once started.
    @ivar addresses: the bound listeners, C{{"http": "127.0.0.1:PORT"}}.
    """

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any = None,
        *,
        decider: Optional[Decider] = None,
        audit_metadata: Optional[Mapping[str, str]] = None,
        audit_sinks: Tuple[Sink, ...] = (),
        sources: Optional[Sources] = None,
        paths: Optional[SourcePaths] = None,
        environ: Optional[Mapping[str, str]] = None,
        interception: Optional[Interception] = None,
        exit_on_error: bool = True,
        resolver: Optional[IHostnameResolver] = None,
    ) -> None:
        """
        @param exit_on_error: a start-up failure prints one line on stderr
            and exits 1; when false it is logged and raised (a daemonizing
            C{twistd} reports it to its waiting parent).
        @param resolver: resolves allowed names instead of the reactor's
            resolver (see L{NetworkProxyBuilder.resolver}).
        """
        self.config = config
        self._exit_on_error = exit_on_error
        self.proxy: Optional[NetworkProxy] = None
        self.addresses: Dict[str, str] = {}
        self._handle: Optional[ProxyHandle] = None
        builder = NetworkProxy.builder().config(config).audit_metadata(audit_metadata or {})
        if reactor is not None:
            builder.reactor(reactor)
        if decider is not None:
            builder.policy_decider(decider)
        for sink in audit_sinks:
            builder.audit_sink(sink)
        if sources is not None:
            builder.sources(sources, paths or SourcePaths())
        if environ is not None:
            builder.environ(environ)
        if interception is not None:
            builder.interception(interception)
        if resolver is not None:
            builder.resolver(resolver)
        self._builder = builder

    def startService(self) -> None:
        super().startService()
        outcome: List[Any] = []
        self._builder.build().addCallback(self._run).addBoth(outcome.append)
        (result,) = outcome
        if isinstance(result, Failure):
            result.trap(ListenError, InterceptionError, ValueError)
            if not self._exit_on_error:
                _log.error("codexproxy: {message}", message=result.getErrorMessage())
                result.raiseException()
            sys.stderr.write(f"codexproxy: {result.getErrorMessage()}\n")
            raise SystemExit(1)

    def _run(self, proxy: NetworkProxy) -> defer.Deferred[None]:
        self.proxy = proxy

        def running(handle: ProxyHandle) -> None:
            self._handle = handle
            if handle.http_addr is not None:
                self.addresses["http"] = handle.http_addr
            if handle.socks_addr is not None:
                self.addresses["socks"] = handle.socks_addr

        return proxy.run().addCallback(running)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        handle, self._handle = self._handle, None
        if handle is None:
            return defer.succeed(None)
        return handle.shutdown()


__all__ = [
    "Interception",
    "InterceptionError",
    "ListenError",
    "NetworkProxy",
    "NetworkProxyBuilder",
    "ProxyHandle",
    "ProxyService",
    "head_limits",
    "load_interception",
    "policy_from_config",
]
