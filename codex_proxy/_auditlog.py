"""
Reading an audit log back (SPEC §9.3, for C{codexproxy report}): its lines
in bounded pieces, and a tally of them in constant memory: totals by
decision and reason, and one small record per blocked destination (host,
port, protocol, client), capped at L{MAX_DESTINATIONS}. A malformed line
is counted and skipped.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any, BinaryIO, Dict, Iterable, Iterator, List, Optional, Tuple

import attrs

#: Distinct blocked destinations remembered; later new ones are only counted.
MAX_DESTINATIONS = 50_000

#: Longer lines are no audit events (a host name has at most 253
#: characters); they are read in pieces of this size and counted malformed.
MAX_LINE = 1 << 16

#: The audit timestamp format (SPEC §9.3); it sorts as text.
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_RELATIVE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ReportError(ValueError):
    """
    An argument the report cannot use (C{--since}).
    """


@attrs.define
class Blocked:
    """
    One blocked destination's tally.

    @ivar method: the HTTP method of its latest event (C{none} for SOCKS).
    """

    host: str
    port: int
    protocol: str
    client: Optional[str]
    count: int
    first: str
    last: str
    method: str


@attrs.define
class Tally:
    """
    What a pass over the log found.

    @ivar reasons: (decision, reason) -> events.
    @ivar filtered: well-formed events left out by C{--since}/C{--client}.
    @ivar untracked: blocked events of destinations past
        L{MAX_DESTINATIONS}.
    """

    lines: int = 0
    malformed: int = 0
    filtered: int = 0
    untracked: int = 0
    reasons: Dict[Tuple[str, str], int] = attrs.Factory(dict)
    blocked: Dict[Tuple[str, int, str, Optional[str]], Blocked] = attrs.Factory(dict)

    def decisions(self) -> Dict[str, int]:
        """
        Events by decision.
        """
        totals: Dict[str, int] = {}
        for (decision, _), count in self.reasons.items():
            totals[decision] = totals.get(decision, 0) + count
        return totals

    def top(self, count: int) -> List[Blocked]:
        """
        The C{count} most-blocked destinations, most first.
        """
        ranked = sorted(self.blocked.values(), key=lambda b: (-b.count, b.host, b.port))
        return ranked[:count]


def parse_since(text: str, now: float) -> str:
    """
    The audit timestamp from which C{--since TEXT} keeps events: RFC 3339
    (a time without offset is UTC) or a span back from C{now} (C{90s},
    C{30m}, C{2h}, C{7d}).

    @raise ReportError: C{text} is neither.
    """
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        seconds = int(relative.group(1)) * _UNITS[relative.group(2)]
        when = datetime.datetime.fromtimestamp(now - seconds, datetime.timezone.utc)
    else:
        try:
            when = datetime.datetime.fromisoformat(text.strip())
        except ValueError:
            raise ReportError(
                f"--since: expected RFC 3339 (2026-01-31T12:00:00Z) or a span"
                f" like 30m, 2h, 7d; got {text!r}"
            ) from None
    return _canonical(when)


def _canonical(when: datetime.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    when = when.astimezone(datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _stamp(value: Any) -> str:
    """
    An event's timestamp in the canonical form, which sorts as text.

    @raise ValueError: it is not a timestamp.
    """
    if not isinstance(value, str):
        raise ValueError(value)
    if _STAMP.fullmatch(value):
        return value
    return _canonical(datetime.datetime.fromisoformat(value))


def tally(
    lines: Iterable[bytes],
    since: Optional[str] = None,
    client: Optional[str] = None,
    limit: int = MAX_DESTINATIONS,
) -> Tally:
    """
    Count the events of an audit log, one line at a time.

    @param since: keep events from this canonical timestamp on.
    @param client: keep only the events of this C{client.identity}.
    @param limit: how many distinct blocked destinations to remember.
    """
    result = Tally()
    reasons = result.reasons
    blocked = result.blocked
    for line in lines:
        if not line.strip():
            continue
        result.lines += 1
        try:
            event = json.loads(line)
            stamp = _stamp(event["event.timestamp"])
            decision = event["network.policy.decision"]
            reason = event["network.policy.reason"]
            identity = event.get("client.identity")
            if not (
                isinstance(decision, str)
                and isinstance(reason, str)
                and (identity is None or isinstance(identity, str))
            ):
                raise ValueError(line)
            if decision != "allow":
                key = (
                    event["server.address"],
                    event["server.port"],
                    event["network.transport.protocol"],
                    identity,
                )
                if not (
                    isinstance(key[0], str)
                    and type(key[1]) is int
                    and isinstance(key[2], str)
                ):
                    raise ValueError(line)
        except (ValueError, KeyError, TypeError, AttributeError):
            result.malformed += 1
            continue
        if (since is not None and stamp < since) or (
            client is not None and identity != client
        ):
            result.filtered += 1
            continue
        counted = (decision, reason)
        reasons[counted] = reasons.get(counted, 0) + 1
        if decision == "allow":
            continue
        method = event.get("http.request.method")
        method = method if isinstance(method, str) else "none"
        entry = blocked.get(key)
        if entry is not None:
            entry.count += 1
            entry.method = method
            if stamp < entry.first:
                entry.first = stamp
            elif stamp > entry.last:
                entry.last = stamp
        elif len(blocked) < limit:
            blocked[key] = Blocked(*key, count=1, first=stamp, last=stamp, method=method)
        else:
            result.untracked += 1
    return result


def read_lines(log: BinaryIO, limit: int = MAX_LINE) -> Iterator[bytes]:
    """
    The lines of C{log}, each at most C{limit} bytes: of a longer one only
    its first C{limit} bytes (no whole JSON object, so counted malformed),
    the rest skipped. A file without line breaks stays in bounded memory.
    """
    while line := log.readline(limit):
        if len(line) == limit and not line.endswith(b"\n"):
            rest = line
            while rest and not rest.endswith(b"\n"):
                rest = log.readline(limit)
        yield line


__all__ = [
    "Blocked", "MAX_DESTINATIONS", "ReportError", "Tally", "parse_since", "read_lines", "tally",
]  # fmt: skip
