"""
C{twistd codexproxy}: command-line options and service assembly.

The config is loaded and validated while the options are parsed, so a bad
config stops C{twistd} with a one-line message and a non-zero exit before
anything is bound. The proxy itself is a L{codex_proxy.api.NetworkProxy}
run by a L{codex_proxy.api.ProxyService}; this module adds what only the
command has: the ports file, the audit log, C{--resolve}, SIGHUP reloading
and a clean exit status on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from twisted.application.service import MultiService, Service
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from codex_proxy._twistdlog import twistd_observer
from codex_proxy.api import NetworkProxy, ProxyService
from codex_proxy.audit import JSONLinesLog, Sink, otel_sink
from codex_proxy.config import ConfigError, ProxyConfig, default_config_path
from codex_proxy.mitm import Interception, InterceptionError, load_interception
from codex_proxy.resolver import ResolveEntryError, parse_resolve_entry, resolver_with
from codex_proxy.sources import SourcePaths, Sources, effective_config, load_sources, rules_path

_log = Logger()


#: How long C{twistd codexproxy} polls without sleeping after handling
#: events, by default: a destination on loopback answers well within it,
#: and each wakeup from sleep costs tens of microseconds (about 50 on a
#: 2-core virtual machine).
BUSY_POLL_US = 100


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
            ' JSON ({"http": "127.0.0.1:PORT", "socks": ...}); removed on exit.',
        ],
        [
            "audit-log",
            None,
            None,
            "Append every policy decision to this file as one JSON object per"
            " line (the audit event's flat dotted fields).",
        ],
        [
            "busy-poll-us",
            None,
            str(BUSY_POLL_US),
            "After handling socket events, poll for more without sleeping for"
            " up to this many microseconds before sleeping (0 to 10000; 0: sleep"
            " at once): a destination's answer or a client's next request that"
            " comes meanwhile is served without a wakeup's latency, for at most"
            " this much CPU each time the proxy goes idle; only while events"
            " come that soon.",
        ],
    ]

    config: ProxyConfig
    paths: SourcePaths
    resolve: Tuple[str, ...] = ()
    #: C{--busy-poll-us}, in seconds.
    busy_poll: float = BUSY_POLL_US / 1e6

    def opt_resolve(self, entry: str) -> None:
        """
        NAME=ADDR[,ADDR...]: answer NAME with these addresses instead of
        asking DNS (repeatable; like curl's --resolve, without a port). The
        answers are vetted like DNS answers: a private address is refused
        unless allow_local_binding = true.
        """
        try:
            parse_resolve_entry(entry)
        except ResolveEntryError as e:
            raise usage.UsageError(f"--resolve: {e}") from None
        self.resolve = (*self.resolve, entry)

    sources: Sources
    interception: Optional[Interception]

    def postOptions(self) -> None:
        self.busy_poll = _busy_poll(self["busy-poll-us"])
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
        # Like config errors, CA errors stop start-up before logging begins.
        self.interception = None
        if self.config.enabled and (self.config.mitm or self.config.secrets):
            try:
                self.interception = load_interception(os.environ)
            except InterceptionError as e:
                sys.stderr.write(f"codexproxy: {e}\n")
                raise SystemExit(1)


def _busy_poll(text: str) -> float:
    """
    The C{--busy-poll-us} value, in seconds.
    """
    try:
        us = int(text)
    except ValueError:
        us = -1
    if not 0 <= us <= 10000:
        raise usage.UsageError(f"--busy-poll-us: {text!r} is not a whole number of microseconds from 0 to 10000")
    return us / 1e6


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


class _PortsFile(Service):
    """
    Writes the bound addresses of a started L{ProxyService} and the
    secrets' placeholders (SPEC §12) atomically, again after each reload
    (which may add or remove a secret), and removes the file on stop.
    """

    def __init__(self, path: str, proxy: ProxyService) -> None:
        self._path = path
        self._proxy = proxy

    def startService(self) -> None:
        super().startService()
        self._write()

    def reloaded(self, ok: bool) -> None:
        """
        After a reload that took effect, write the file again, while running
        (a reload that ends after the stop leaves no file behind). A write
        that fails is logged and the old file stays.
        """
        if not (ok and self.running):
            return
        try:
            self._write()
        except OSError as e:
            _log.error("cannot rewrite the ports file {path}: {error}", path=self._path, error=e)

    def _write(self) -> None:
        tmp = f"{self._path}.tmp{os.getpid()}"
        document: dict[str, Any] = dict(self._proxy.addresses)
        placeholders = self._proxy.proxy.secrets.placeholders
        if placeholders:
            document["placeholders"] = placeholders
        with open(tmp, "w") as f:
            json.dump(document, f)
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


class _CleanExitOnSignals(Service):
    """
    Once the reactor runs, replace its SIGTERM and SIGINT handlers with ones
    that only stop it: C{twistd} re-raises the signal after a clean stop, so
    the process would end "killed by SIGTERM" instead of with status 0.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        # Now, for a signal that comes before the reactor runs (the ports
        # file is already written), and again once the reactor has put its
        # own handlers in place.
        self._install()
        self._reactor.addSystemEventTrigger("after", "startup", self._install)

    def _install(self) -> None:
        def stop(number: int, frame: Any) -> None:
            _log.info("Received {name}, shutting down.", name=signal.Signals(number).name)
            self._reactor.callFromThread(self._reactor.stop)

        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, stop)


class _ReloadOnHangup(Service):
    """
    Re-reads the policy files of a running L{ProxyService} on SIGHUP (SPEC
    §2.5); the previous handler is put back on stop.
    """

    def __init__(
        self, reactor: Any, proxy: ProxyService, reloaded: Optional[Callable[[bool], None]] = None
    ) -> None:
        self._reactor = reactor
        self._proxy = proxy
        self._reloaded = reloaded
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()

        def handler(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self._reload)

        self._previous = signal.signal(signal.SIGHUP, handler)

    def _reload(self) -> None:
        done = self._proxy.proxy.reload()
        if self._reloaded is not None:
            done.addCallback(self._reloaded)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None


class _Process(MultiService):
    """
    The services of one C{twistd codexproxy}. Given C{twistd}'s options,
    the application they join, unless it has a log observer, gets one:
    what twistd would log to, spared the events that have no text
    (L{codex_proxy._twistdlog}). It is built as they join, just before
    twistd starts logging, as twistd would build its own.
    """

    def __init__(self, twistd: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self._twistd = twistd

    def setServiceParent(self, parent: Any) -> None:
        if (
            self._twistd is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver) is None
        ):
            observer = twistd_observer(self._twistd)
            if observer is not None:
                parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)


def assemble(
    config: ProxyConfig,
    reactor: Any = None,
    ports_file: Optional[str] = None,
    audit_log: Optional[str] = None,
    environ: Mapping[str, str] = os.environ,
    sources: Optional[Sources] = None,
    paths: Optional[SourcePaths] = None,
    interception: Optional[Interception] = None,
    daemon: bool = False,
    own_signals: bool = False,
    resolve: Sequence[str] = (),
    twistd: Optional[Mapping[str, Any]] = None,
    busy_poll: float = BUSY_POLL_US / 1e6,
) -> MultiService:
    """
    The services of one C{twistd codexproxy}, started in order (audit sinks,
    the proxy, SIGHUP reloading, SIGTERM/SIGINT handling, the ports file)
    and stopped in reverse.

    @param daemon: C{twistd} daemonizes: a start-up failure is raised (its
        waiting parent prints it and exits 1) instead of C{SystemExit},
        which would leave that parent waiting forever.
    @param own_signals: the services are the process (C{twistd}): SIGTERM
        and SIGINT stop it with exit status 0.
    @param sources: the parsed files C{config} was computed from; with
        C{paths}, the policy reloads from them on SIGHUP.
    @param resolve: C{--resolve} entries (already validated): these names
        are answered from a table, the others by the reactor's resolver.
    @param twistd: C{twistd}'s own options, when it runs the services: the
        application they join logs where twistd would, without formatting
        the events that have no text.
    """
    if reactor is None:
        from twisted.internet import reactor
    top = _Process(twistd)
    sinks: list[Sink] = []
    log = None
    if audit_log is not None:
        log = JSONLinesLog(audit_log, reactor)
        _AuditSink(log.close, log.open).setServiceParent(top)
        sinks.append(log)
    exporter = otel_sink(environ)
    if exporter is not None:
        _AuditSink(exporter.close).setServiceParent(top)
        sinks.append(exporter)
    builder = (
        NetworkProxy.builder()
        .config(config)
        .reactor(reactor)
        .environ(environ)
        .resolver(resolver_with(resolve, reactor.nameResolver))
    )
    for sink in sinks:
        builder.audit_sink(sink)
    if sources is not None:
        builder.sources(sources, paths or SourcePaths())
    if interception is not None:
        builder.interception(interception)
    try:
        created = builder.create()
    except ConfigError as e:
        # A secret whose value cannot be loaded (SPEC §12): like a bad config.
        sys.stderr.write(f"codexproxy: config error: {e}\n")
        raise SystemExit(1)
    proxy = ProxyService(created, exit_on_error=not daemon, freeze_gc=True, turn_writes=True, busy_poll=busy_poll)
    metrics = created.metrics
    if metrics is not None and log is not None:
        log.written, log.dropped = metrics.audit_written, metrics.audit_dropped
    for entry in resolve:
        _log.info("--resolve {entry}: answered without DNS, vetted like DNS", entry=entry)
    proxy.setServiceParent(top)
    ports = None if ports_file is None else _PortsFile(ports_file, proxy)
    if paths is not None:
        _ReloadOnHangup(reactor, proxy, None if ports is None else ports.reloaded).setServiceParent(top)
    if own_signals:
        # Before the ports file: a client that sees it may signal at once.
        _CleanExitOnSignals(reactor).setServiceParent(top)
    if ports is not None:
        ports.setServiceParent(top)
    return top


def makeService(options: Options) -> MultiService:
    server = options.parent  # twistd's own options, when run by twistd
    return assemble(
        options.config,
        ports_file=options["ports-file"],
        audit_log=options["audit-log"],
        sources=options.sources,
        paths=options.paths,
        interception=options.interception,
        daemon=server is not None and not server["nodaemon"],
        own_signals=server is not None,
        resolve=options.resolve,
        twistd=server,
        busy_poll=options.busy_poll,
    )
