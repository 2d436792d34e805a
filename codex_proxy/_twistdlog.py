"""
The log observer of C{twistd codexproxy}: twistd's own, spared the events
that have no text.

Every decision and every connection's outcome is an event (SPEC §9.3), and
most carry no text (allowed decisions, outcomes): they are for structured
observers. twistd's text observer formats each of them only to find nothing
to write, about 2.5 us per kept-alive request (4% of its CPU cost, by
C{bench.cpu_per_request}). twistd uses an application's C{ILogObserver}
component, when it has one, instead of the observer it would build from
C{--logfile}, C{--syslog} and C{-n}; L{twistd_observer} is the one it would
build, by twistd's own logger, behind L{TextOnly}. What is written is the
same, line for line; every other observer still gets every event.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from twisted.logger import ILogObserver, LegacyLogObserverWrapper, LogEvent
from zope.interface import implementer


@implementer(ILogObserver)
class TextOnly:
    """
    Hands C{observer} the events a text log could write a line for: those
    with a format (legacy C{log.msg} lines have one too) or a failure. An
    event with neither is text to no observer that writes text: twistd's
    file and syslog observers write nothing for it.
    """

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_format") is None and "log_failure" not in event and "log_flattened" not in event:
            return
        self.observer(event)


def _twistd_logger() -> Optional[Callable[[Mapping[str, Any]], Any]]:
    """
    The class twistd makes its logger with on posix systems, or C{None}
    where it has none (Windows).
    """
    try:
        from twisted.scripts._twistd_unix import UnixAppLogger
    except ImportError:
        return None
    return UnixAppLogger


def twistd_observer(
    server: Mapping[str, Any], logger: Optional[Callable[[Mapping[str, Any]], Any]] = None
) -> Optional[TextOnly]:
    """
    What twistd, run with the options C{server}, would log to, behind
    L{TextOnly}; C{None} (twistd builds its own, as always) when C{--logger}
    names an observer factory (twistd then ignores the application's) or
    this Twisted's logger does not build observers the way this reads.

    @param logger: twistd's logger class (default: its posix one).
    """
    if server.get("logger"):
        return None
    logger = logger or _twistd_logger()
    build = getattr(logger(server), "_getLogObserver", None) if logger is not None else None
    if build is None:
        return None
    observer = build()
    if not ILogObserver.providedBy(observer):
        # A legacy observer (syslog's), wrapped as twistd wraps it.
        observer = LegacyLogObserverWrapper(observer)
    return TextOnly(observer)
