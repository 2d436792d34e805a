"""
The embedding API as users meet it: the README's example program and
C{twistd -ny examples/embed.tac}, each run as a real process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    """
    The python block that follows the C{embed-example} marker in README.md.
    """
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- embed-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its embed-example block"
    return match.group(1)


def test_readme_example_runs(tmp_path, proxyproc):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=proxyproc.clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"children get http://127\.0\.0\.1:\d+", lines[0]), lines
    assert lines[1:] == ["403 blocked-by-policy", "blocked: blocked.example is not approved"]


def test_embed_tac_runs_under_twistd(tmp_path, proxyproc, curl):
    config = tmp_path / "config.toml"
    config.write_text(proxyproc.render_config({"allowed_domains": ["127.0.0.1"]}))
    process = subprocess.Popen(
        [proxyproc.twistd_path(), "-ny", str(REPO / "examples" / "embed.tac"), "--pidfile="],
        cwd=tmp_path,
        env=proxyproc.clean_env(PYTHONPATH=str(REPO), CODEX_PROXY_CONFIG=str(config)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    running = proxyproc.RunningProxy(process, tmp_path, config, tmp_path / "unused.json")
    running.start_reader()
    try:
        line = running.wait_for_line("HTTP proxy listening on")
        address = line.rsplit(" ", 1)[1]
        result = curl.run("http://unlisted.example/", proxy=f"http://{address}")
        assert result.status == 403
        assert result.headers["x-proxy-error"] == "blocked-by-policy"
        body = result.json()
        assert (body["decision"], body["source"], body["reason"]) == (
            "ask",
            "decider",
            "policy_denied",
        )
        running.wait_for_line("policy decision ask (policy_denied) for http unlisted.example:80")
    finally:
        running.stop()
    assert "Traceback" not in running.output
