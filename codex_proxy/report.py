"""
C{codexproxy report AUDIT.jsonl} (SPEC §14.1): what an audit log says was
blocked, and the allowlist entries that would let it through.

The file is streamed and tallied in constant memory by
L{codex_proxy._auditlog}.

For each of the most-blocked destinations the report shows what the
current config decides and the edit that would change it: the C{explain}
"to change" line, computed by the C{explain} callable the command line
hands in (this module imports no listener and no Twisted). It ends with a
TOML C{allowed_domains} snippet: exact hosts only, never a local target
(SPEC §5.1), never one the denylist matches, and only hosts that the
config with the snippet applied allows, checked with the same C{explain}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

import attrs

from codex_proxy.addresses import authority
from codex_proxy._auditlog import Blocked, ReportError, Tally, parse_since, read_lines, tally
from codex_proxy._text import escape
from codex_proxy.config import ProxyConfig, default_config_path, load_config
from codex_proxy.domains import InvalidHost, PatternError, PatternKind
from codex_proxy.domains import normalize_host, parse_pattern
from codex_proxy.model import UNIX_SOCKET_HOST, Protocol, ProxyRequest
from codex_proxy.policy import is_local_target

#: The decision rows of one request under a config, and whether it is
#: allowed: C{codex_proxy.cli.explain} with the config's policy compiled.
Explain = Callable[[ProxyConfig, ProxyRequest], Tuple[List[Tuple[str, str]], bool]]

_UNJUDGED = "none known: the audit event names no host and port explain can judge"


def request_for(entry: Blocked) -> Optional[ProxyRequest]:
    """
    The request C{explain} should judge for a blocked destination, or
    C{None} when the audit event does not say enough (a unix socket, whose
    path is never audited; an unknown protocol).
    """
    if entry.host == UNIX_SOCKET_HOST or not 1 <= entry.port <= 65535:
        return None
    try:
        protocol = Protocol(entry.protocol)
    except ValueError:
        return None
    method: Optional[str] = None if entry.method == "none" else entry.method
    if protocol is Protocol.HTTPS_CONNECT:
        method = "CONNECT"
    elif protocol in (Protocol.HTTP, Protocol.HTTPS):
        method = method or "GET"
    return ProxyRequest(protocol, entry.host, entry.port, method=method)


@attrs.frozen
class Advice:
    """
    What the current config says about one blocked destination.

    @ivar now: C{allow} or the current decision and reason.
    @ivar change: the C{explain} "to change" line (or why there is none).
    @ivar suggest: the exact C{allowed_domains} entry the snippet adds for
        it, if any.
    """

    entry: Blocked
    now: str
    change: str
    suggest: Optional[str] = None


def advise(config: ProxyConfig, explain: Explain, entries: Sequence[Blocked]) -> List[Advice]:
    """
    Ask C{explain} about each destination under C{config}, then suggest
    the exact hosts that a config with all the suggestions added allows.
    """
    judged = []
    for entry in entries:
        request = request_for(entry)
        rows, allowed = explain(config, request) if request else ([], False)
        judged.append((entry, request, dict(rows), allowed))
    candidates = {
        pattern: None
        for entry, request, _, allowed in judged
        if request and not allowed and (pattern := _candidate(entry.host))
    }
    trial = attrs.evolve(
        config, allowed_domains=tuple(dict.fromkeys(config.allowed_domains + tuple(candidates)))
    )
    advice = []
    for entry, request, found, allowed in judged:
        if request is None:
            advice.append(Advice(entry, "unknown", _UNJUDGED))
        elif allowed:
            advice.append(Advice(entry, "allow", f"none: allowed by {found['matched']}"))
        else:
            pattern = _candidate(entry.host)
            suggest = pattern if pattern in candidates and explain(trial, request)[1] else None
            now = f"{found['decision']} ({found.get('reason', '').split(' ', 1)[0]})"
            advice.append(Advice(entry, now, found["to change"], suggest))
    return advice


def _candidate(host: str) -> Optional[str]:
    """
    C{host} as an exact allowlist entry, or C{None} if it may never be
    suggested: not a valid host name or address, or a local target (SPEC
    §5.1: such an entry would unlock this machine or a private network).
    """
    try:
        pattern = parse_pattern(normalize_host(host))
    except (InvalidHost, PatternError):
        return None
    if pattern.kind is not PatternKind.EXACT or is_local_target(pattern.domain):
        return None
    return pattern.text


def snippet(config: ProxyConfig, additions: Sequence[str]) -> str:
    """
    The TOML to paste: the config's own C{allowed_domains} list (the
    entries the file's C{allowed_domains} key holds) with the additions,
    to replace that key in the network table.
    """
    key = f"{config.source}: {config.section}.allowed_domains["
    own = [p for p in config.allowed_domains if config.pattern_sources[p].startswith(key)]
    lines = [
        f"# in [{config.section}] of {config.source}: replace allowed_domains with",
        "allowed_domains = [",
    ]
    lines += [f"  {json.dumps(pattern)}," for pattern in own]
    lines += [f"  {json.dumps(p)},  # suggested" for p in additions if p not in own]
    lines.append("]")
    return "\n".join(lines) + "\n"


@attrs.frozen
class Report:
    """
    Everything the report prints.
    """

    path: str
    config: ProxyConfig
    tally: Tally
    advice: List[Advice]
    suggested: List[str]

    def as_json(self) -> Dict[str, Any]:
        t = self.tally
        return {
            "file": self.path,
            "config": self.config.source,
            "lines": t.lines,
            "malformed": t.malformed,
            "filtered": t.filtered,
            "decisions": t.decisions(),
            "reasons": [
                {"decision": d, "reason": r, "count": n} for (d, r), n in _most(t.reasons.items())
            ],
            "blocked_destinations": len(t.blocked),
            "untracked_blocked_events": t.untracked,
            "top_blocked": [
                {
                    "host": a.entry.host,
                    "port": a.entry.port,
                    "protocol": a.entry.protocol,
                    "client": a.entry.client,
                    "count": a.entry.count,
                    "first_seen": a.entry.first,
                    "last_seen": a.entry.last,
                    "now": a.now,
                    "to_change": a.change,
                    "suggested": a.suggest,
                }
                for a in self.advice
            ],
            "suggested_allowed_domains": self.suggested,
            "snippet": snippet(self.config, self.suggested) if self.suggested else None,
        }

    def write_text(self, out: TextIO) -> None:
        """
        The report for people; every value read from the log is escaped, so
        a hostile host name cannot plant terminal escapes.
        """
        t = self.tally
        lines = [
            f"audit log: {self.path}",
            f"events: {t.lines - t.malformed - t.filtered} counted; malformed lines"
            f" skipped: {t.malformed}; outside --since/--client: {t.filtered}",
            "decisions:",
        ]
        lines += [f"  {d:<8} {n:>10}" for d, n in _most(t.decisions().items())]
        lines.append("reasons:")
        lines += [f"  {d:<8} {r:<28} {n:>10}" for (d, r), n in _most(t.reasons.items())]
        untracked = f", and {t.untracked} events of untracked ones" if t.untracked else ""
        lines.append(
            f"top blocked destinations ({len(self.advice)} of {len(t.blocked)}{untracked}):"
        )
        for a in self.advice:
            e = a.entry
            lines.append(
                f"  {e.count:>8}  {authority(e.host, e.port)}  {e.protocol}  client {e.client or '-'}"
                f"  first {e.first}  last {e.last}"
            )
            lines.append(f"            now: {a.now}; to change: {a.change}")
        out.write("".join(escape(line) + "\n" for line in lines))
        if self.suggested:
            out.write("suggested allowed_domains:\n" + snippet(self.config, self.suggested))
        else:
            out.write("no allowed_domains suggestion\n")


def _most(counts: Iterable[Tuple[Any, int]]) -> List[Tuple[Any, int]]:
    return sorted(counts, key=lambda item: (-item[1], item[0]))


def build_report(
    path: str,
    lines: Iterable[bytes],
    config: ProxyConfig,
    explain: Explain,
    since: Optional[str] = None,
    client: Optional[str] = None,
    top: int = 20,
) -> Report:
    """
    Tally C{lines} and advise on the C{top} most-blocked destinations.
    """
    counted = tally(lines, since, client)
    advice = advise(config, explain, counted.top(top))
    suggested = list(dict.fromkeys(a.suggest for a in advice if a.suggest is not None))
    return Report(path, config, counted, advice, suggested)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    The options of C{codexproxy report}.
    """
    parser.add_argument("audit_log", metavar="AUDIT.jsonl", help="an --audit-log file")
    parser.add_argument(
        "--config", "-c", metavar="FILE", help="default: $CODEX_HOME/config.toml"
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only events from WHEN on: RFC 3339 (2026-01-31T12:00:00Z)"
        " or a span back (30m, 2h, 7d)",
    )
    parser.add_argument("--client", metavar="NAME", help="only the events of client NAME")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--top", type=int, default=20, metavar="N", help="destinations shown (default 20)"
    )


def run_report(
    args: argparse.Namespace,
    out: TextIO,
    explain: Explain,
    now: Optional[float] = None,
) -> int:
    """
    Run C{codexproxy report} with the options of L{add_arguments}.

    @param explain: C{codex_proxy.cli.explain} over the config's policy.
    @param now: the time C{--since 2h} counts back from (default: now).
    @raise ReportError: a bad C{--since}.
    @raise OSError: the log cannot be read.
    @raise codex_proxy.config.ConfigError: the config is unusable.
    """
    since = None
    if args.since is not None:
        since = parse_since(args.since, time.time() if now is None else now)
    config = load_config(args.config or default_config_path(os.environ))
    with open(args.audit_log, "rb") as log:
        report = build_report(
            args.audit_log, read_lines(log), config, explain, since, args.client, args.top
        )
    if args.json:
        out.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        report.write_text(out)
    return 0


__all__ = [
    "Explain", "ReportError", "Tally", "add_arguments", "build_report", "run_report", "snippet",
]  # fmt: skip
