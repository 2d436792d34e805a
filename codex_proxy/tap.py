"""
C{twistd codexproxy}: command-line options and service assembly.

The config is loaded and validated while the options are parsed, so a bad
config stops C{twistd} with a one-line message and a non-zero exit before
anything is bound. Binding itself is L{codex_proxy.api.ProxyService}'s; this
module adds what only the command has: the ports file and the audit log.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Mapping, Optional

from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from codex_proxy.api import ProxyService
from codex_proxy.audit import JSONLinesLog, Sink, otel_sink
from codex_proxy.config import (
    ConfigError,
    ProxyConfig,
    default_config_path,
    load_config,
)

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
        [
            "audit-log",
            None,
            None,
            "Append every policy decision to this file as one JSON object per"
            " line (the audit event's flat dotted fields).",
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


class _PortsFile(Service):
    """
    Writes the bound addresses of a started L{ProxyService} atomically, and
    removes the file on stop.
    """

    def __init__(self, path: str, proxy: ProxyService) -> None:
        self._path = path
        self._proxy = proxy

    def startService(self) -> None:
        super().startService()
        tmp = f"{self._path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self._proxy.addresses, f)
        os.replace(tmp, self._path)
        _log.info("ports file written: {path}", path=self._path)

    def stopService(self) -> None:
        super().stopService()
        try:
            os.remove(self._path)
        except FileNotFoundError:
            pass


class _AuditSink(Service):
    """
    Opens an audit sink before the proxy starts and closes (flushes) it
    after the proxy stopped; an audit log that cannot be opened stops
    start-up like a bad config.
    """

    def __init__(self, close: Callable[[], None], open: Optional[Callable[[], None]] = None):
        self._open = open
        self._close = close

    def startService(self) -> None:
        super().startService()
        if self._open is not None:
            try:
                self._open()
            except OSError as e:
                sys.stderr.write(f"codexproxy: cannot open the audit log: {e}\n")
                raise SystemExit(1)

    def stopService(self) -> None:
        super().stopService()
        self._close()


def assemble(
    config: ProxyConfig,
    reactor: Any = None,
    ports_file: Optional[str] = None,
    audit_log: Optional[str] = None,
    environ: Mapping[str, str] = os.environ,
) -> MultiService:
    """
    The services of one C{twistd codexproxy}, started in order (audit sinks,
    the proxy, the ports file) and stopped in reverse.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    top = MultiService()
    sinks: list[Sink] = []
    if audit_log is not None:
        log = JSONLinesLog(audit_log, reactor)
        _AuditSink(log.close, log.open).setServiceParent(top)
        sinks.append(log)
    exporter = otel_sink(environ)
    if exporter is not None:
        _AuditSink(exporter.close).setServiceParent(top)
        sinks.append(exporter)
    proxy = ProxyService(config, reactor, audit_sinks=tuple(sinks))
    proxy.setServiceParent(top)
    if ports_file is not None:
        _PortsFile(ports_file, proxy).setServiceParent(top)
    return top


def makeService(options: Options) -> MultiService:
    return assemble(
        options.config,
        ports_file=options["ports-file"],
        audit_log=options["audit-log"],
    )
