"""
C{codexproxy report} as a subcommand of the C{codexproxy} command: its
output, and the exit statuses SPEC §14.1 and the man page promise (0 done,
1 unreadable log or invalid config, 2 bad option).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Tuple

from codex_proxy import cli
from support.auditlog import CONFIG, event


def report(tmp_path: Path, *options: str, config: str = CONFIG) -> Tuple[int, str, str]:
    path = tmp_path / "config.toml"
    path.write_text(config)
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["report", "--config", str(path), *options], out, err)
    return status, out.getvalue(), err.getvalue()


def test_report_suggests_the_blocked_host(tmp_path: Path):
    log = tmp_path / "audit.jsonl"
    log.write_text(event("registry.npmjs.example") + "\n" + event("allowed.example", reason=None) + "\n")
    status, out, err = report(tmp_path, str(log))
    assert (status, err) == (0, "")
    assert f"audit log: {log}" in out
    assert '"registry.npmjs.example",  # suggested' in out


def test_bad_since_is_a_usage_error(tmp_path: Path):
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    status, out, err = report(tmp_path, "--since", "yesterday", str(log))
    assert (status, out) == (2, "")
    assert err.startswith("codexproxy report: ") and "yesterday" in err


def test_unreadable_log_and_invalid_config_exit_1(tmp_path: Path):
    status, _, err = report(tmp_path, str(tmp_path / "missing.jsonl"))
    assert status == 1 and "missing.jsonl" in err
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    status, _, err = report(tmp_path, str(log), config='[network]\nmode = "fast"\n')
    assert status == 1 and "network.mode" in err
