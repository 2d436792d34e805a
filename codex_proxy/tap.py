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
from typing import Any, Dict, List, Optional

from twisted.application.service import Service
from twisted.internet import defer, endpoints
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
    load_config,
)
from codex_proxy.httpproxy import HTTPProxyFactory
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
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
            "ports-file",
            None,
            None,
            "After binding, write the bound listener addresses to this file as"
            ' JSON ({"http": "127.0.0.1:PORT"}); removed on exit.',
        ],
    ]

    config: ProxyConfig

    def postOptions(self) -> None:
        path = self["config"] or default_config_path(os.environ)
        try:
            self.config = load_config(path)
        except ConfigError as e:
            sys.stderr.write(f"codexproxy: config error: {e}\n")
            raise SystemExit(1)


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


def _stop_cleanly_on_signals(reactor: Any) -> None:
    """
    Replace the reactor's SIGTERM and SIGINT handlers with ones that only
    stop it: C{twistd} re-raises the signal after a clean stop, so the
    process would end "killed by SIGTERM" instead of with status 0.
    """

    def stop(number: int, frame: Any) -> None:
        _log.info("Received {name}, shutting down.", name=signal.Signals(number).name)
        reactor.callFromThread(reactor.stop)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, stop)


class StartupError(Exception):
    """
    The proxy cannot start (a listener cannot be bound).
    """


class ProxyService(Service):
    """
    Binds the listeners of a config and serves them until stopped.
    """

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any = None,
        ports_file: Optional[str] = None,
        daemon: bool = False,
        own_signals: bool = False,
    ) -> None:
        """
        @param daemon: C{twistd} daemonizes: a start-up failure is raised as
            L{StartupError}, which its waiting parent prints before exiting
            1 (a C{SystemExit} would leave that parent waiting forever).
        @param own_signals: the service is the process (C{twistd}): SIGTERM
            and SIGINT stop it with exit status 0.
        """
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.config = config
        self._reactor = reactor
        self._ports_file = ports_file
        self._ports: List[IListeningPort] = []
        self._serving = False
        self._daemon = daemon
        self._own_signals = own_signals
        self.addresses: Dict[str, str] = {}
        self.policy = PolicyService(
            policy_from_config(config),
            resolver=reactor.nameResolver,
            clock=reactor,
            auditor=Auditor(reactor.seconds),
            resolve_timeout=config.limits.connect_timeout_s,
        )

    def privilegedStartService(self) -> None:
        """
        Bind before C{twistd} reports a successful start: a daemonizing
        C{twistd} parent exits only then (with 1 when binding failed), and
        the ports file exists by the time it does.
        """
        super().privilegedStartService()
        if self._own_signals:
            self._reactor.addSystemEventTrigger(
                "after", "startup", _stop_cleanly_on_signals, self._reactor
            )
        self._serve()

    def startService(self) -> None:
        super().startService()
        self._serve()

    def _serve(self) -> None:
        if self._serving:
            return
        self._serving = True
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
            if self._daemon:
                _log.error("codexproxy: {message}", message=failures[0])
                raise StartupError(failures[0])
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
        self._serving = False
        if self._ports_file is not None:
            try:
                os.remove(self._ports_file)
            except FileNotFoundError:
                pass
        ports, self._ports = self._ports, []
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])


def makeService(options: Options) -> ProxyService:
    server = options.parent
    return ProxyService(
        options.config,
        ports_file=options["ports-file"],
        daemon=server is not None and not server["nodaemon"],
        own_signals=server is not None,
    )
