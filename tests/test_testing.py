"""
The fakes of L{codex_proxy.testing} and of C{tests/support} provide the
interfaces of the seams they fill, so a test that passes with a fake says
something about the real thing.
"""

from __future__ import annotations

import pytest
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorUDP,
    ITCPTransport,
    ITLSTransport,
    IUDPTransport,
)
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from codex_proxy.audit import Auditor
from codex_proxy.decider import Allow
from codex_proxy.interfaces import IAuditor, IPolicyDecider
from codex_proxy.resolver import TableResolver
from codex_proxy.testing import RecordingAuditor, RecordingDecider, StaticResolver
from support import http, mitm, socks
from support.transports import TCPTransport


@pytest.mark.parametrize(
    "interface, fake",
    [
        (IHostnameResolver, StaticResolver({"a.test": ["203.0.114.1"]})),
        (IHostnameResolver, TableResolver({})),
        (IAuditor, RecordingAuditor(MemoryReactorClock().seconds)),
        (IAuditor, Auditor(MemoryReactorClock().seconds)),
        (IPolicyDecider, RecordingDecider(lambda request: Allow())),
    ],
    ids=lambda value: type(value).__name__,
)
def test_each_fake_and_its_real_counterpart_provide_the_interface(interface, fake):
    assert verifyObject(interface, fake)


@pytest.mark.parametrize(
    "interface, fake",
    [
        (ITCPTransport, TCPTransport()),
        (ITLSTransport, http.HalfCloseTransport()),
        (ITLSTransport, mitm.TLSCapableTransport(True)),
        (IUDPTransport, socks.FakeUDPPort(None, "127.0.0.1", 40000)),
        (IReactorUDP, socks.Reactor()),
        (IHostnameResolver, socks.PendingResolver()),
    ],
    ids=lambda value: type(value).__name__,
)
def test_each_harness_fake_provides_the_interface_it_stands_in_for(interface, fake):
    assert verifyObject(interface, fake)
