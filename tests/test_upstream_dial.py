"""
A direct dial over real loopback TCP: the connection it made is freed by
reference counting once it closes, leaving no reference cycle (a dial,
its Deferred, Twisted's connector and transport) for the collector.
"""

from __future__ import annotations

import gc
from ipaddress import ip_address
from typing import Any

import pytest_twisted
from twisted.internet import base, defer, reactor, task
from twisted.internet.protocol import Factory, Protocol

from codex_proxy.upstream import Upstream, _Dialling


class _Origin(Protocol):
    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_a_closed_outbound_connection_leaves_no_cycle_for_the_collector():
    origin = _Origin()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: origin), interface="127.0.0.1")
    enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        out = yield Upstream(reactor).connect([ip_address("127.0.0.1")], port.getHost().port)
        assert out.transport.getPeer().port == port.getHost().port
        out.transport.loseConnection()
        del out
        yield origin.lost
        yield task.deferLater(reactor, 0, lambda: None)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (_Dialling, base.BaseConnector))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
        yield port.stopListening()
    assert left == []
