"""
C{twistd codexproxy}: command-line options and service assembly.

The config is loaded and validated while the options are parsed, so a bad
config stops C{twistd} with a one-line message and a non-zero exit before
anything is bound.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, Callable, Dict, List, Optional

from twisted.application.service import Service
from twisted.internet import defer, endpoints, threads
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage

from codex_proxy import _httphead
from codex_proxy.audit import Auditor
from codex_proxy.config import (
    ConfigError,
    ListenAddress,
    ProxyConfig,
    default_config_path,
)
from codex_proxy.httpproxy import HTTPProxyFactory
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.policystate import PolicyState
from codex_proxy.rules import SourcePaths, Sources, effective_config, load_sources, rules_path
from codex_proxy.upstream import Upstream

_log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the codex-proxy egress-policy proxy. The network section of the"
        " config file decides what is allowed; see codexproxy(1)."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "The config file (default: $CODEX_HOME/config.toml, CODEX_HOME"
            " defaulting to ~/.codex).",
        ],
        [
            "requirements",
            None,
            None,
            "Managed requirements file ([experimental_network] table) that caps"
            " and extends the config.",
        ],
        [
            "ports-file",
            None,
            None,
            "After binding, write the bound listener addresses to this file as"
            ' JSON ({"http": "127.0.0.1:PORT"}); removed on exit.',
        ],
    ]

    config: ProxyConfig
    paths: SourcePaths
    sources: Sources

    def postOptions(self) -> None:
        try:
            self.paths = SourcePaths(
                self["config"] or default_config_path(os.environ),
                self["requirements"],
                _remembered_rules_path(given_config=self["config"] is not None),
            )
            self.sources = load_sources(self.paths)
        except ConfigError as e:
            sys.stderr.write(f"codexproxy: config error: {e}\n")
            raise SystemExit(1)
        self.config = effective_config(self.sources)


def _remembered_rules_path(given_config: bool) -> Optional[str]:
    """
    Where remembered approvals live; without C{CODEX_HOME} or C{HOME} there
    is no such place, which is an error only when the config is looked up
    there too.
    """
    try:
        return rules_path(os.environ)
    except ConfigError:
        if given_config:
            return None
        raise


def policy_from_config(config: ProxyConfig) -> Policy:
    """
    Compile the policy of a config (once per load, never per request).

    MITM is not part of this build, so a limited-mode CONNECT stays blocked
    with C{mitm_required} even when the config asks for interception: the
    safe side of a missing feature.
    """
    return Policy.build(
        enabled=config.enabled,
        mode=config.mode,
        mitm=False,
        allow_local_binding=config.allow_local_binding,
        allowed=config.allowed_domains,
        denied=config.denied_domains,
        managed_allowed_domains_only=config.managed_allowed_domains_only,
    )


def head_limits(config: ProxyConfig) -> _httphead.HeadLimits:
    limits = config.limits
    return _httphead.HeadLimits(
        max_request_line_bytes=limits.max_request_line_bytes,
        max_header_bytes=limits.max_header_bytes,
        max_header_fields=limits.max_header_fields,
    )


def _endpoint(reactor: Any, address: ListenAddress) -> Any:
    if ":" in address.host:
        return endpoints.TCP6ServerEndpoint(reactor, address.port, interface=address.host)
    return endpoints.TCP4ServerEndpoint(reactor, address.port, interface=address.host)


def _bound(port: IListeningPort) -> str:
    host = port.getHost()
    return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"


class ProxyService(Service):
    """
    Binds the listeners of a config and serves them until stopped.
    """

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any = None,
        ports_file: Optional[str] = None,
        sources: Optional[Sources] = None,
        paths: Optional[SourcePaths] = None,
    ) -> None:
        """
        @param sources: the parsed files C{config} was computed from; with
            C{paths}, the policy reloads on SIGHUP (L{PolicyState}).
        """
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.config = config
        self._reactor = reactor
        self._ports_file = ports_file
        self._ports: List[IListeningPort] = []
        self.addresses: Dict[str, str] = {}
        self.policy = PolicyService(
            policy_from_config(config),
            resolver=reactor.nameResolver,
            clock=reactor,
            auditor=Auditor(reactor.seconds),
            resolve_timeout=config.limits.connect_timeout_s,
        )
        self.state: Optional[PolicyState] = None
        self._restore_sighup: Optional[Callable[[], None]] = None
        if sources is not None and paths is not None:
            self.state = PolicyState(
                self.policy,
                sources,
                paths,
                compile=policy_from_config,
                run_in_thread=lambda f: threads.deferToThreadPool(
                    reactor, reactor.getThreadPool(), f
                ),
            )

    def startService(self) -> None:
        super().startService()
        if self.state is not None:
            self._restore_sighup = reload_on_sighup(self._reactor, self.state.reload)
        config = self.config
        for warning in config.warnings:
            _log.warn("{warning}", warning=warning)
        if config.mitm:
            _log.warn(
                "{source}: mitm = true, but HTTPS interception is not available"
                " in this build: CONNECT in limited mode stays blocked",
                source=config.source,
            )
        if not config.enabled:
            _log.info(
                "codex-proxy is disabled (enabled = false in {source}); no listener bound",
                source=config.source,
            )
        else:
            self._listen()
        self._writePortsFile()

    def _listen(self) -> None:
        config = self.config
        reactor = self._reactor
        factory = HTTPProxyFactory(
            self.policy,
            Upstream(reactor, config.limits.connect_timeout_s),
            reactor,
            head_limits(config),
            tunnel_idle=config.limits.tunnel_idle_s,
            header_timeout=config.limits.header_timeout_s,
            keepalive_idle=config.limits.keepalive_idle_s,
        )
        failures: List[str] = []

        def bound(port: IListeningPort) -> None:
            self._ports.append(port)
            self.addresses["http"] = _bound(port)

        def failed(failure: Any) -> None:
            failures.append(
                f"cannot listen on {config.http_listen} (proxy_url): "
                f"{failure.getErrorMessage()}"
            )

        # TCP endpoints bind synchronously: the Deferred has fired on return.
        _endpoint(reactor, config.http_listen).listen(factory).addCallbacks(bound, failed)
        if failures:
            for port in self._ports:
                port.stopListening()
            sys.stderr.write(f"codexproxy: {failures[0]}\n")
            raise SystemExit(1)
        _log.info("codex-proxy HTTP proxy listening on {address}", address=self.addresses["http"])

    def _writePortsFile(self) -> None:
        if self._ports_file is None:
            return
        tmp = f"{self._ports_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.addresses, f)
        os.replace(tmp, self._ports_file)
        _log.info("ports file written: {path}", path=self._ports_file)

    def stopService(self) -> Any:
        super().stopService()
        if self._restore_sighup is not None:
            self._restore_sighup()
            self._restore_sighup = None
        if self._ports_file is not None:
            try:
                os.remove(self._ports_file)
            except FileNotFoundError:
                pass
        ports, self._ports = self._ports, []
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])


def reload_on_sighup(reactor: Any, reload: Callable[[], Any]) -> Callable[[], None]:
    """
    Call C{reload} on the reactor thread whenever SIGHUP arrives; returns
    the function that puts the previous handler back.
    """

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload)

    previous = signal.signal(signal.SIGHUP, handler)
    return lambda: signal.signal(signal.SIGHUP, previous)


def makeService(options: Options) -> ProxyService:
    return ProxyService(
        options.config,
        ports_file=options["ports-file"],
        sources=options.sources,
        paths=options.paths,
    )
