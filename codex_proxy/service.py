"""
L{ProxyService}: a L{codex_proxy.api.NetworkProxy} as a Twisted C{IService},
for C{twistd codexproxy} and C{.tac} files (SPEC §9.1). Importable as
C{codex_proxy.api.ProxyService}.
"""

from __future__ import annotations

import gc
import sys
from typing import TYPE_CHECKING, Dict, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from codex_proxy._turnwrites import TURN_WRITES
from codex_proxy.config import ProxyConfig
from codex_proxy.listening import ListenError

if TYPE_CHECKING:
    from codex_proxy.api import NetworkProxy, ProxyHandle

_log = Logger()


class ProxyService(Service):
    """
    Runs a L{NetworkProxy} as an C{IService}: bound on start, shut down
    (connections included) on stop. A listener that cannot be bound stops
    start-up with one line on stderr and exit status 1.

    @ivar proxy: the proxy.
    @ivar addresses: the bound listeners, C{{"http": "127.0.0.1:PORT"}}.
    @ivar busy_poll: see C{__init__}.
    """

    def __init__(
        self,
        proxy: NetworkProxy,
        *,
        exit_on_error: bool = True,
        freeze_gc: bool = False,
        turn_writes: bool = False,
        busy_poll: float = 0.0,
    ) -> None:
        """
        @param exit_on_error: a start-up failure prints one line on stderr
            and exits 1; when false it is logged and raised (a daemonizing
            C{twistd} reports it to its waiting parent).
        @param freeze_gc: the proxy is the process (C{twistd codexproxy}):
            once started, everything built so far is moved out of the
            garbage collector's sight (C{gc.freeze}), until stopped.
        @param turn_writes: the proxy is the process: what its TCP
            connections write is sent at the end of the reactor's turn
            (L{codex_proxy._turnwrites}), until stopped.
        @param busy_poll: with C{turn_writes}, on the epoll reactor: seconds
            the reactor polls without sleeping after a turn that handled
            socket events, before it sleeps (the C{spin} of
            L{codex_proxy._turnwrites.TurnWrites.install}).
        """
        self.proxy = proxy
        self._exit_on_error = exit_on_error
        self._freeze_gc = freeze_gc
        self._turn_writes = turn_writes
        self.busy_poll = busy_poll
        self.addresses: Dict[str, str] = {}
        self._handle: Optional[ProxyHandle] = None

    @property
    def config(self) -> ProxyConfig:
        """
        The effective config of the proxy in force.
        """
        return self.proxy.config

    def startService(self) -> None:
        super().startService()
        try:
            self._handle = self.proxy.listen()
        except ListenError as e:
            if not self._exit_on_error:
                _log.error("codexproxy: {message}", message=str(e))
                raise
            sys.stderr.write(f"codexproxy: {e}\n")
            raise SystemExit(1)
        self.addresses = self._handle.addresses()
        if self._turn_writes:
            TURN_WRITES.install(self.proxy.reactor, spin=self.busy_poll)
        if self._freeze_gc:
            # The long-lived state (modules, policy, metrics, certificates)
            # is built: a full collection no longer walks it all while
            # requests wait. Without this, make bench's keep-alive p99 was
            # about 1.5x that of the same build with it (p50 unchanged).
            gc.collect()
            gc.freeze()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._freeze_gc:
            gc.unfreeze()
        if self._turn_writes:
            TURN_WRITES.uninstall()
        handle, self._handle = self._handle, None
        if handle is None:
            return defer.succeed(None)
        return handle.shutdown()
