"""
Tests for L{codex_proxy.report}: C{codexproxy report} on small audit logs,
as an operator reads its text, its JSON and its TOML snippet.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import pytest

from codex_proxy import cli
from codex_proxy.model import Protocol, Reason
from codex_proxy._auditlog import ReportError, parse_since, read_lines, tally
from codex_proxy.report import add_arguments, run_report
from support.auditlog import CONFIG, T0, event


#: What the command line hands the report: C{explain} over the config's
#: policy.
explain = cli._judge


def run(
    tmp_path: Path,
    lines: Sequence[str],
    *options: str,
    config: str = CONFIG,
    now: float = T0 + 86400,
) -> Tuple[int, str]:
    log = tmp_path / "audit.jsonl"
    log.write_text("".join(line + "\n" for line in lines))
    path = tmp_path / "config.toml"
    path.write_text(config)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(log), "--config", str(path), *options])
    out = io.StringIO()
    status = run_report(args, out, explain, now=now)
    return status, out.getvalue()


def as_json(tmp_path: Path, lines: Sequence[str], *options: str, **kw: Any) -> Dict[str, Any]:
    status, text = run(tmp_path, lines, "--json", *options, **kw)
    assert status == 0
    document: Dict[str, Any] = json.loads(text)
    return document


def test_totals_and_malformed_lines(tmp_path: Path) -> None:
    """
    Totals by decision and reason; malformed lines are counted and
    skipped, blank lines ignored.
    """
    lines = [
        event("allowed.example", reason=None),
        event("allowed.example", reason=None),
        event("new.example"),
        "not json",
        "[1, 2]",
        '{"event.timestamp": "2026-01-01T00:00:00.000Z"}',
        json.dumps({**json.loads(event("x.example")), "server.port": "443"}),
        json.dumps({**json.loads(event("x.example")), "event.timestamp": "yesterday"}),
        "",
        event("denied.example", reason=Reason.DENIED),
        "\xff\xfe",
    ]
    report = as_json(tmp_path, lines)
    assert report["lines"] == 10
    assert report["malformed"] == 6
    assert report["decisions"] == {"allow": 2, "deny": 2}
    assert {(r["decision"], r["reason"], r["count"]) for r in report["reasons"]} == {
        ("allow", "allowed", 2),
        ("deny", "not_allowed", 1),
        ("deny", "denied", 1),
    }


def test_top_blocked_with_first_and_last_seen(tmp_path: Path) -> None:
    """
    Blocked destinations are grouped by host, port, protocol and client,
    most-blocked first, with first and last seen whatever the line order.
    """
    lines = [
        event("often.example", at=T0 + 50),
        event("often.example", at=T0 + 10),
        event("often.example", at=T0 + 99.5),
        event("often.example", port=80, protocol=Protocol.HTTP, at=T0),
        event("once.example", protocol=Protocol.SOCKS5_TCP, at=T0 + 5, identity="ci"),
        event("once.example", protocol=Protocol.SOCKS5_TCP, at=T0 + 6, identity="ci"),
    ]
    top = as_json(tmp_path, lines, "--top", "2")["top_blocked"]
    assert [(t["host"], t["port"], t["protocol"], t["count"]) for t in top] == [
        ("often.example", 443, "https_connect", 3),
        ("once.example", 443, "socks5_tcp", 2),
    ]
    assert top[0]["first_seen"] == "2026-01-01T00:00:10.000Z"
    assert top[0]["last_seen"] == "2026-01-01T00:01:39.500Z"
    assert top[1]["client"] == "ci"
    assert top[0]["to_change"].startswith('add "often.example" to allowed_domains in [network]')


def test_since_absolute_and_relative(tmp_path: Path) -> None:
    """
    C{--since} keeps events from a time on, given in RFC 3339 or as a
    span back from now.
    """
    lines = [event("old.example", at=T0), event("new.example", at=T0 + 7200)]
    for since in ("2026-01-01T01:00:00Z", "2026-01-01T03:00:00+02:00", "90m"):
        report = as_json(tmp_path, lines, "--since", since, now=T0 + 3 * 3600)
        assert [t["host"] for t in report["top_blocked"]] == ["new.example"]
        assert report["filtered"] == 1


def test_since_invalid() -> None:
    """
    A C{--since} that is neither a time nor a span is a usage error.
    """
    with pytest.raises(ReportError, match="--since"):
        parse_since("last tuesday", T0)
    assert parse_since("2h", T0) == "2025-12-31T22:00:00.000Z"


def test_client(tmp_path: Path) -> None:
    """
    C{--client NAME} counts only that client's events.
    """
    lines = [
        event("mine.example", protocol=Protocol.SOCKS5_TCP, identity="ci"),
        event("theirs.example", protocol=Protocol.SOCKS5_TCP, identity="other"),
        event("anon.example"),
    ]
    report = as_json(tmp_path, lines, "--client", "ci")
    assert [t["host"] for t in report["top_blocked"]] == ["mine.example"]
    assert report["filtered"] == 2


def test_snippet_never_local_never_denied(tmp_path: Path) -> None:
    """
    The snippet suggests public allowlist misses only: no local target
    (whatever its spelling), no denied host, nothing already allowed, no
    unix socket, no invalid host.
    """
    lines = [
        event("new.example"),
        event("127.0.0.1", protocol=Protocol.HTTP, port=80, reason=Reason.NOT_ALLOWED_LOCAL),
        event("localhost", reason=Reason.NOT_ALLOWED_LOCAL),
        event("10.1.2.3", protocol=Protocol.SOCKS5_TCP, reason=Reason.NOT_ALLOWED_LOCAL),
        event("denied.example", reason=Reason.DENIED),
        event("sub.denied.example", reason=Reason.NOT_ALLOWED),
        event("x.wild.example", reason=Reason.UPSTREAM_CONNECT_FAILED),
        event("unix-socket", 0, Protocol.HTTP, Reason.UNIX_SOCKET_NOT_ALLOWED),
        event("bad host!", reason=Reason.INVALID_HOST),
    ]
    report = as_json(tmp_path, lines)
    assert report["suggested_allowed_domains"] == ["new.example", "sub.denied.example"]
    now = {t["host"]: t["now"] for t in report["top_blocked"]}
    assert now["x.wild.example"] == "allow"
    assert now["denied.example"] == "deny (denied)"


def test_snippet_only_what_it_unlocks(tmp_path: Path) -> None:
    """
    In limited mode without interception a tunnel needs more than an
    allowlist entry: it is not suggested, and its line says why.
    """
    config = CONFIG + 'mode = "limited"\n'
    lines = [event("tunnel.example"), event("plain.example", protocol=Protocol.HTTP, port=80)]
    report = as_json(tmp_path, lines, config=config)
    assert report["suggested_allowed_domains"] == ["plain.example"]


def test_pasted_snippet_makes_explain_allow(tmp_path: Path) -> None:
    """
    The snippet, pasted in place of the config's allowed_domains, makes
    C{codexproxy explain} allow every suggested destination, and keeps the
    entries the list already had.
    """
    lines = [
        event("one.example"),
        event("two.example", protocol=Protocol.HTTP, port=8080),
        event("Three.Example.", protocol=Protocol.SOCKS5_TCP, port=22),
        event("127.0.0.1"),
        event("denied.example", reason=Reason.DENIED),
    ]
    report = as_json(tmp_path, lines)
    assert sorted(report["suggested_allowed_domains"]) == [
        "one.example",
        "three.example",
        "two.example",
    ]
    snippet = report["snippet"]
    pasted = re.sub(r"(?m)^allowed_domains = .*$", lambda _: snippet, CONFIG)
    config = tmp_path / "pasted.toml"
    config.write_text(pasted)
    for target in (
        "one.example:443",
        "http://two.example:8080/",
        "three.example:22",
        "allowed.example:443",
    ):
        out = io.StringIO()
        assert cli.main(["explain", "--config", str(config), target], out) == 0, out.getvalue()
    for target in ("127.0.0.1:443", "denied.example:443"):
        assert cli.main(["explain", "--config", str(config), target], io.StringIO()) == 1


def test_text_output(tmp_path: Path) -> None:
    """
    The text report: totals, the blocked destination with its counts and
    the change that would allow it, and the snippet last.
    """
    lines = [event("new.example"), event("new.example"), "junk", event("ok.example", reason=None)]
    status, text = run(tmp_path, lines, "--config", str(tmp_path / "config.toml"))
    assert status == 0
    assert "events: 3 counted; malformed lines skipped: 1;" in text
    assert re.search(r"deny\s+not_allowed\s+2", text)
    assert re.search(r"\s2\s+new\.example:443\s+https_connect\s+client -", text)
    assert 'to change: add "new.example" to allowed_domains' in text
    assert text.endswith('  "new.example",  # suggested\n]\n')


def test_destinations_capped() -> None:
    """
    Past the cap, new blocked destinations are only counted, so memory
    stays bounded whatever the log holds.
    """
    lines = [event(f"h{n}.example").encode() for n in range(5)] + [event("h0.example").encode()]
    counted = tally(lines, limit=3)
    assert len(counted.blocked) == 3
    assert counted.untracked == 2
    assert counted.reasons[("deny", "not_allowed")] == 6


def test_text_escapes_log_values(tmp_path: Path) -> None:
    """
    A host or client name in the log cannot plant terminal escapes or
    fake lines in the text report.
    """
    hostile = json.loads(event("x.example", protocol=Protocol.SOCKS5_TCP, identity="c"))
    hostile["server.address"] = "evil\x1b[2J\nfake line"
    hostile["client.identity"] = "c\u2028lient"
    status, text = run(tmp_path, [json.dumps(hostile)])
    assert "\x1b" not in text and "\u2028" not in text
    assert "evil\\x1b[2J\\x0afake line" in text
    assert "no allowed_domains suggestion" in text


def test_overlong_line_is_malformed() -> None:
    """
    A line longer than any audit event is read in bounded pieces and
    counted as one malformed line; the lines around it still count.
    """
    good = event("new.example").encode() + b"\n"
    data = good + b'{"a": "' + b"x" * 2000 + b'"}\n' + good + b"y" * 50
    lines = list(read_lines(io.BytesIO(data), limit=512))
    counted = tally(lines)
    assert (counted.lines, counted.malformed) == (4, 2)
    assert counted.reasons[("deny", "not_allowed")] == 2
