"""
The log observer of C{twistd codexproxy}: twistd's own, spared the events
that have no text.
"""

from __future__ import annotations

import signal

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions

from codex_proxy._twistdlog import TextOnly, twistd_observer
from codex_proxy.audit import emit_structured
from codex_proxy.tap import Options, makeService

ENABLED = b'[network]\nenabled = true\nproxy_url = "127.0.0.1:0"\n'


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)


@pytest.mark.parametrize(
    "event, passed",
    [
        ({"log_format": "a line", "log_level": LogLevel.info}, True),
        ({"log_format": None, "log_failure": Failure(ValueError("x"))}, True),
        ({"log_format": None, "log_flattened": {}}, True),
        ({"log_format": None, "audit": {"event.name": "x"}}, False),
        ({"audit": {"event.name": "x"}}, False),
    ],
)
def test_text_only_passes_what_a_text_log_could_write(event, passed):
    seen = Recorder()
    TextOnly(seen)(event)
    assert seen.events == ([event] if passed else [])


@pytest.fixture
def usr1():
    """
    twistd's file logger takes SIGUSR1 (to rotate) when nothing else has it:
    put back what was there.
    """
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def _server(*argv):
    server = ServerOptions()
    server.parseOptions([*argv])
    return server


def test_the_observer_writes_what_twistds_would_and_skips_textless_events(tmp_path, usr1):
    """
    Behind the filter is twistd's own file observer for C{--logfile}: a line
    of text is written as twistd writes it; an audit event with no text,
    which twistd's observer would format to nothing, never reaches it.
    """
    path = tmp_path / "twistd.log"
    observer = twistd_observer(_server("-n", "--logfile", str(path)))
    assert isinstance(observer, TextOnly)
    twistds, handed = observer.observer, []
    observer.observer = lambda event: (handed.append(event), twistds(event))
    log = Logger(namespace="test", observer=observer)
    log.info("hello {who}", who="there")
    emit_structured(log, audit={"event.name": "codex.network_proxy.policy_decision"})
    twistds._outFile.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(" [test#info] hello there")
    assert [event["log_format"] for event in handed] == ["hello {who}"]


def test_a_legacy_observer_is_wrapped_as_twistd_wraps_it():
    """
    twistd's syslog observer is a legacy one: it is handed events the way
    twistd hands them to it.
    """
    seen = []

    class SyslogLike:
        def __init__(self, options):
            pass

        def _getLogObserver(self):
            return seen.append

    observer = twistd_observer({"syslog": True}, logger=SyslogLike)
    Logger(namespace="test", observer=observer).info("to syslog")
    (event,) = seen
    assert event["message"] == () and "format" in event and event["isError"] == 0


@pytest.mark.parametrize(
    "server, logger",
    [
        # --logger: twistd uses that factory and ignores the application's.
        ({"logger": "some.module.factory"}, None),
        # A Twisted whose logger builds its observer some other way.
        ({}, lambda options: object()),
    ],
)
def test_twistd_builds_its_own_observer_when_this_cannot_stand_in(server, logger):
    assert twistd_observer(server, logger=logger) is None


def test_twistd_codexproxy_gives_the_application_the_filtered_observer(tmp_path):
    """
    Under twistd, the services' application gets the observer as its
    C{ILogObserver} component, which twistd uses instead of its own; one
    that already has a component keeps it, and without twistd nothing is set.
    """
    (tmp_path / "c.toml").write_bytes(ENABLED)
    args = ["codexproxy", "--config", str(tmp_path / "c.toml")]
    server = _server("-n", *args)
    application = Application("codexproxy")
    makeService(server.subOptions).setServiceParent(application)
    assert isinstance(application.getComponent(ILogObserver), TextOnly)

    chosen = Recorder()
    application = Application("codexproxy")
    application.setComponent(ILogObserver, chosen)
    makeService(server.subOptions).setServiceParent(application)
    assert application.getComponent(ILogObserver) is chosen

    options = Options()
    options.parseOptions(args[1:])
    application = Application("codexproxy")
    makeService(options).setServiceParent(application)
    assert application.getComponent(ILogObserver) is None
