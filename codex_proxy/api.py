"""
The embedding API (SPEC §9.1): build a proxy from a config, run it inside any
Twisted program, hand its address to child processes, stop it.

    proxy = yield NetworkProxy.builder().config(cfg).http_addr("127.0.0.1:0").build()
    handle = yield proxy.run()
    ... proxy.env() ...
    yield handle.shutdown()

L{ProxyService} runs a L{NetworkProxy} as an C{IService} for C{.tac} files
and C{twistd codexproxy}. Compiling the config, loading the CA, choosing
parents and binding the listeners (L{codex_proxy.listening}) happen
elsewhere; this module puts the pieces together.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Mapping, Optional

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer, threads
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import Logger

from codex_proxy.audit import Auditor, Sink
from codex_proxy.childenv import child_env
from codex_proxy.config import ConfigError, ListenAddress, ProxyConfig, parse_listen_address
from codex_proxy.connections import Connections
from codex_proxy.decider import Decider
from codex_proxy.descriptors import fit_max_connections
from codex_proxy.listening import ListenError, address_text, bind, bound_address, listeners
from codex_proxy.metrics import Metrics
from codex_proxy.mitm import Interception, load_interception
from codex_proxy.model import Verdict
from codex_proxy.parents import parents_from_config
from codex_proxy.policy import policy_from_config
from codex_proxy.policystate import PolicyState
from codex_proxy.policyservice import PolicyService
from codex_proxy.secrets import Secrets
from codex_proxy.service import ProxyService
from codex_proxy.sources import SourcePaths, Sources, effective_config

_log = Logger()


@attrs.frozen
class ProxyHandle:
    """
    A running proxy: the addresses its listeners actually bound (C{None}
    for a listener that is off), and L{shutdown}.
    """

    http_addr: Optional[str]
    socks_addr: Optional[str]
    _proxy: "NetworkProxy" = attrs.field(repr=False)
    dns_addr: Optional[str] = None
    admin_addr: Optional[str] = None

    def addresses(self) -> Dict[str, str]:
        """
        The bound listeners by name, C{{"http": "127.0.0.1:PORT"}}.
        """
        named = {"http": self.http_addr, "socks": self.socks_addr, "dns": self.dns_addr}
        named["admin"] = self.admin_addr
        return {name: address for name, address in named.items() if address is not None}

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
        instead of loading them from C{$CODEX_HOME/proxy/} at L{create}.
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

    def create(self) -> NetworkProxy:
        """
        The L{NetworkProxy}, made now (for a C{.tac} file or a
        L{ProxyService}).

        @raise ValueError: an address given here is not on loopback and the
            config does not allow that (nothing is replaced silently in code).
        @raise codex_proxy.mitm.InterceptionError: C{mitm = true} and the CA
            cannot be loaded (fail closed).
        @raise ConfigError: a secret's value cannot be loaded (SPEC §12).
        """
        config = self._config
        unix = bool(config.allow_unix_sockets) or config.dangerously_allow_all_unix_sockets
        for address in self._listens.values():
            if not address.is_loopback and (
                unix or not config.dangerously_allow_non_loopback_proxy
            ):
                raise ValueError(
                    f"listener address {address} is not on loopback"
                    " (needs dangerously_allow_non_loopback_proxy and no unix sockets)"
                )
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        interception = self._interception
        if (config.mitm or config.secrets) and interception is None:
            interception = load_interception(self._environ)
        sources = self._sources or Sources(config)
        return NetworkProxy(
            attrs.evolve(sources, config=self._listening(sources.config)),
            self._paths,
            reactor,
            Auditor(reactor.seconds, self._metadata, self._sinks),
            self._decider,
            self._environ,
            interception,
            self._resolver,
        )

    def _listening(self, config: ProxyConfig) -> ProxyConfig:
        """
        C{config} with the listener addresses given here.
        """
        listens = self._listens
        return attrs.evolve(
            config,
            http_listen=listens.get("http_listen", config.http_listen),
            socks_listen=listens.get("socks_listen", config.socks_listen),
        )

    def build(self) -> defer.Deferred[NetworkProxy]:
        """
        L{create} as SPEC §9.1 has it: a Deferred firing with the proxy, or
        failing with what L{create} raises.
        """
        return defer.maybeDeferred(self.create)


_compile = functools.partial(policy_from_config, realpath=os.path.realpath)


class NetworkProxy:
    """
    One proxy: its policy service and, while running, its listeners.

    @ivar policy: the L{PolicyService} deciding every request.
    @ivar secrets: the secrets' placeholders and values (SPEC §12).

    @ivar metrics: the figures of SPEC §13, kept when C{admin_url} is set.
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
        secrets: Optional[Secrets] = None,
    ) -> None:
        config = effective_config(sources)
        self.secrets = secrets if secrets is not None else Secrets(environ).load(config.secrets)
        self._interception = interception
        self._environ = environ
        self.parents = parents_from_config(config, environ)
        self._reactor = reactor
        self._connections = Connections(config.limits.max_connections, config.limits.max_connections_per_client)
        self._listening: Optional[MultiService] = None
        self._handle: Optional[ProxyHandle] = None
        self.metrics = (
            Metrics(reactor.seconds(), (client.name for client in config.clients))
            if config.admin_listen is not None
            else None
        )
        if self.metrics is not None:
            self.metrics.attach(auditor.sinks, self._connections)
        self.policy = PolicyService(
            _compile(config),
            resolver=resolver or reactor.nameResolver,
            clock=reactor,
            auditor=auditor,
            resolve_timeout=config.limits.connect_timeout_s,
            decider=decider,
            decider_timeout=config.limits.decider_timeout_s,
            observe=None if self.metrics is None else self.metrics.observe_decision,
        )
        self._state = PolicyState(
            self.policy,
            sources,
            paths,
            compile=_compile,
            run_in_thread=lambda f: threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), f
            ),
            disabled=self._connections.closeOutbound,
            secrets=self.secrets,
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

    @property
    def reactor(self) -> Any:
        """
        The reactor the proxy listens, dials and keeps time with.
        """
        return self._reactor

    def run(self) -> defer.Deferred[ProxyHandle]:
        """
        L{listen} as SPEC §9.1 has it: a Deferred firing with the handle, or
        failing with what L{listen} raises.
        """
        return defer.maybeDeferred(self.listen)

    def listen(self) -> ProxyHandle:
        """
        Bind the listeners of an enabled config (none of a disabled one) and
        tell the policy service their addresses, so that the proxy never
        dials itself.

        @raise ListenError: a listener cannot be bound; the ones already
            bound are released.
        """
        if self._handle is not None:
            raise RuntimeError("this proxy is already running")
        self._logStart()
        if self.config.enabled:
            self._connections.max_clients = fit_max_connections(
                self.config.limits.max_connections
            )
        wanted = listeners(
            self.config,
            self.policy,
            self._reactor,
            self._connections,
            self.parents,
            self._interception,
            self._environ,
            self.secrets,
            metrics=self.metrics,
            ready=lambda: self._handle is not None,
            current=lambda: self.config,
        )
        self._listening, ports = bind(wanted, self._reactor)
        bound = {name: address_text(port) for name, port in ports.items()}
        for name, address in bound.items():
            _log.info(
                "codex-proxy {name} proxy listening on {address}",
                name=name.upper(),
                address=address,
            )
        self.policy.set_own_addresses(bound_address(port) for port in ports.values())
        self._handle = ProxyHandle(
            bound.get("http"), bound.get("socks"), self, bound.get("dns"), bound.get("admin")
        )
        return self._handle

    def _logStart(self) -> None:
        """
        Log what the proxy starts with: config warnings, upstream proxies,
        or that it is disabled.
        """
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
        if not config.enabled:
            _log.info(
                "codex-proxy is disabled (enabled = false in {source}); no listener bound",
                source=config.source,
            )

    def _shutdown(self) -> defer.Deferred[None]:
        self._handle = None
        listening, self._listening = self._listening, None
        stopped = defer.maybeDeferred(listening.stopService) if listening else None
        closed = self._connections.closeAll()
        return defer.gatherResults(
            [d for d in (stopped, closed) if d is not None], consumeErrors=True
        ).addCallback(lambda _: None)

    def env(self, client: Optional[str] = None) -> Dict[str, str]:
        """
        Variables for child processes (SPEC §10): the bound addresses while
        running, else the configured ones; with interception, the CA bundle;
        with C{client}, that client's credentials in the proxy URLs (§11).

        @raise codex_proxy.childenv.EnvError: the proxy is disabled, a listener
            asks for an ephemeral port and is not bound yet, or no C{client}.
        """
        handle = self._handle
        return child_env(
            self.config,
            http=handle.http_addr if handle is not None else None,
            socks=handle.socks_addr if handle is not None else None,
            ca_bundle=self._interception.bundle if self._interception is not None else None,
            placeholders=self.secrets.placeholders,
            client=client,
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
            done = self._state.reload()
        else:
            try:
                self._state.replace(config)
                done = defer.succeed(True)
            except ConfigError as e:
                _log.error("policy reload failed, previous policy kept: {error}", error=str(e))
                done = defer.succeed(False)
        return done if self.metrics is None else done.addCallback(self._counted)

    def _counted(self, ok: bool) -> bool:
        """
        Count a reload's result (SPEC §13); a new config may name other
        clients, the only values of the metrics' C{client} label.
        """
        assert self.metrics is not None
        self.metrics.reloaded(ok)
        if ok:
            self.metrics.set_clients(client.name for client in self.config.clients)
        return ok

    def add_allowed_domain(self, pattern: str, persist: bool = False) -> defer.Deferred[None]:
        """
        Allow C{pattern} from now on (an approval), removing it from the
        denylist; with C{persist}, remember it in
        C{$CODEX_HOME/proxy/network-rules.toml} across restarts.

        @raise codex_proxy.sources.RuleError: invalid, or forbidden by managed
            requirements; nothing changed.
        """
        return self._state.add_allowed_domain(pattern, persist)

    def add_denied_domain(self, pattern: str, persist: bool = False) -> defer.Deferred[None]:
        """
        Deny C{pattern} from now on, removing it from the allowlist; see
        L{add_allowed_domain}.
        """
        return self._state.add_denied_domain(pattern, persist)


__all__ = [
    "ListenError",
    "NetworkProxy",
    "NetworkProxyBuilder",
    "ProxyHandle",
    "ProxyService",
]
