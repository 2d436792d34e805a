"""
The C{codexproxy} command: each subcommand's output and exit status
(0 ok, 1 blocked or invalid, 2 usage).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from codex_proxy import cli
from codex_proxy.config import parse_config
from codex_proxy.policy import Policy

CONFIG = """\
[network]
enabled = true
mode = "{mode}"
allowed_domains = ["**.github.test", "127.0.0.1"]
denied_domains = ["gist.github.test"]

[network.limits]
tunnel_idle_s = 60
"""


@pytest.fixture
def config_file(tmp_path: Path):
    def write(mode: str = "full", text: str | None = None) -> str:
        path = tmp_path / "config.toml"
        path.write_text(CONFIG.format(mode=mode) if text is None else text)
        return str(path)

    return write


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def fields(output: str) -> dict[str, str]:
    """
    The C{label: value} lines of an explanation.
    """
    rows = {}
    for line in output.splitlines():
        label, _, value = line.partition(":")
        rows.setdefault(label.strip(), value.strip())
    return rows


def test_check_config_prints_the_policy_with_sources(config_file):
    path = config_file()
    code, out, err = run("check-config", path)
    assert (code, err) == (0, "")
    assert out.startswith(f"{path}: valid\n")
    assert "enabled:" in out and "mode:" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["**.github.test", f"{path}:", "network.allowed_domains[0]"] in lines
    assert ["127.0.0.1", f"{path}:", "network.allowed_domains[1]"] in lines
    assert ["gist.github.test", f"{path}:", "network.denied_domains[0]"] in lines
    assert "proxy_url:                            127.0.0.1:3128 (default)" in out
    assert "  tunnel_idle_s = 60\n" in out
    assert "  connect_timeout_s = 10 (default)\n" in out


def test_check_config_shows_clamping_warnings_and_empty_allowlist(config_file):
    path = config_file(text='[network]\nproxy_url = "0.0.0.0:3128"\n')
    code, out, _ = run("check-config", path)
    assert code == 0
    assert "empty allowlist: every destination is blocked" in out
    assert "warning: " in out and "replaced by 127.0.0.1:3128" in out


def test_check_config_shows_the_dns_listener(config_file):
    code, out, _ = run("check-config", config_file())
    assert code == 0
    assert "dns_url:                              unset (default)\n" in out
    path = config_file(text='[network]\ndns_url = "dns://127.0.0.1:5353"\n')
    code, out, _ = run("check-config", path)
    assert "dns_url:                              127.0.0.1:5353\n" in out


def test_check_config_invalid_exits_1_naming_file_and_key(config_file):
    path = config_file(text='[network]\nmode = "fast"\n')
    code, out, err = run("check-config", path)
    assert (code, out) == (1, "")
    assert f"{path}: network.mode: unknown value 'fast'" in err
    assert "Traceback" not in err


def test_check_config_defaults_to_codex_home(tmp_path, monkeypatch, config_file):
    config_file()
    monkeypatch.setenv("CODEX_HOME", str(tmp_path))
    code, out, _ = run("check-config")
    assert code == 0 and "valid" in out


def test_explain_allow(config_file):
    code, out, _ = run("explain", "--config", config_file(), "http://api.github.test/x")
    rows = fields(out)
    assert code == 0
    assert rows["request"] == "GET api.github.test:80 (protocol http)"
    assert rows["decision"] == "allow"
    assert "x-proxy-error" not in rows
    assert rows["matched"].startswith('allowed_domains pattern "**.github.test"')
    assert '"api.github.test" to denied_domains' in rows["to change"]
    assert "resolution-time checks are not evaluated" in rows["not checked"]


def test_explain_deny(config_file):
    code, out, _ = run("explain", "-c", config_file(), "gist.github.test:443")
    rows = fields(out)
    assert code == 1
    assert rows["request"] == "CONNECT gist.github.test:443 (protocol https_connect)"
    assert rows["decision"] == "deny"
    assert rows["reason"].startswith("denied ")
    assert rows["x-proxy-error"] == "blocked-by-denylist (HTTP 403)"
    assert "network.denied_domains[0]" in rows["matched"]
    assert rows["to change"].startswith("remove ")
    assert "network.denied_domains[0]" in rows["to change"]


def test_explain_allowlist_miss(config_file):
    path = config_file()
    code, out, _ = run("explain", "-c", path, "https://example.test/")
    rows = fields(out)
    assert code == 1
    assert rows["reason"].startswith("not_allowed ")
    assert rows["x-proxy-error"] == "blocked-by-allowlist (HTTP 403)"
    assert rows["matched"] == "no pattern"
    assert rows["to change"] == f'add "example.test" to allowed_domains in [network] of {path}'


@pytest.mark.parametrize("target", ["http://10.0.0.1/", "http://localhost:8080/", "[::1]:22"])
def test_explain_local_block(config_file, target):
    code, out, _ = run("explain", "-c", config_file(), target)
    rows = fields(out)
    assert code == 1
    assert rows["reason"].startswith("not_allowed_local ")
    assert rows["x-proxy-error"] == "blocked-by-allowlist (HTTP 403)"
    assert "exact entry" in rows["to change"]
    assert "allow_local_binding = true" in rows["to change"]


def test_explain_exactly_allowlisted_local_literal_is_allowed(config_file):
    code, out, _ = run("explain", "-c", config_file(), "http://127.0.0.1:9/")
    assert code == 0
    assert "not checked" not in fields(out)


def test_explain_method_block(config_file):
    code, out, _ = run(
        "explain", "-c", config_file("limited"), "--method", "post", "http://api.github.test/"
    )
    rows = fields(out)
    assert code == 1
    assert rows["request"] == "POST api.github.test:80 (protocol http)"
    assert rows["reason"].startswith("method_not_allowed ")
    assert rows["source"] == "mode_guard"
    assert rows["x-proxy-error"] == "blocked-by-method-policy (HTTP 403)"
    assert rows["to change"].startswith('set mode = "full"')


def test_explain_mitm_required(config_file):
    code, out, _ = run("explain", "-c", config_file("limited"), "https://api.github.test/")
    rows = fields(out)
    assert code == 1
    assert rows["x-proxy-error"] == "blocked-by-mitm-required (HTTP 403)"
    assert "mitm = true" in rows["to change"]


def test_explain_host_port_with_a_method_is_a_plain_request(config_file):
    code, out, _ = run("explain", "-c", config_file(), "-m", "GET", "api.github.test:8080")
    assert code == 0
    assert fields(out)["request"] == "GET api.github.test:8080 (protocol http)"


def test_explain_disabled_proxy(config_file):
    path = config_file(text='[network]\nallowed_domains = ["a.test"]\n')
    code, out, _ = run("explain", "-c", path, "http://a.test/")
    rows = fields(out)
    assert code == 1
    assert rows["x-proxy-error"] == "proxy-disabled (HTTP 503)"
    assert rows["to change"] == f"set enabled = true in [network] of {path}"


def test_explain_names_the_permissions_profile(config_file):
    path = config_file(
        text='default_permissions = "dev"\n[permissions.dev.network]\nenabled = true\n'
    )
    code, out, _ = run("explain", "-c", path, "http://a.test/")
    assert code == 1
    assert f"in [permissions.dev.network] of {path}" in fields(out)["to change"]


def test_explain_intercepted_tunnel_checks_the_inner_request():
    """
    With MITM, a limited-mode CONNECT is let through and the request inside
    is method-checked.
    """
    config = parse_config(CONFIG.format(mode="limited").encode(), "c.toml")
    policy = Policy.build(
        mode=config.mode, mitm=True, allowed=config.allowed_domains, denied=config.denied_domains
    )
    request, inner = cli.parse_target("https://api.github.test/", "PUT")
    rows, allowed = cli.explain(config, policy, request, inner)
    rows = dict(rows)
    assert not allowed
    assert rows["inside"] == "PUT api.github.test:443 (protocol https)"
    assert rows["reason"].startswith("method_not_allowed")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "example.test"], "expected a URL"),
        (["explain", "ftp://example.test/"], "unsupported scheme 'ftp'"),
        (["explain", "http://example.test:99999/"], "invalid port"),
    ],
)
def test_explain_bad_target_is_a_usage_error(config_file, argv, message):
    code, out, err = run(*argv[:1], "-c", config_file(), *argv[1:])
    assert (code, out) == (2, "")
    assert message in err


def test_explain_invalid_host_is_blocked_not_usage(config_file):
    code, out, _ = run("explain", "-c", config_file(), "http://exa_mple..test/")
    assert code == 1
    assert fields(out)["x-proxy-error"] == "invalid-host (HTTP 400)"


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate"], ["env", "--shell", "csh"], ["explain"]]
)
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage: codexproxy" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("check-config", "explain", "env"):
        assert command in out


def test_env_sh_is_evaluable(config_file, tmp_path):
    code, out, err = run("env", "-c", config_file())
    assert (code, err) == (0, "")
    assert "export HTTP_PROXY=http://127.0.0.1:3128\n" in out
    assert "export NO_PROXY=''\n" in out
    shown = subprocess.run(
        ["sh", "-c", out + 'printf "%s|%s|%s" "$https_proxy" "$ALL_PROXY" "${NO_PROXY-unset}"'],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert shown.stdout == "http://127.0.0.1:3128|socks5h://127.0.0.1:8081|"


def test_env_fish_and_json(config_file):
    code, out, _ = run("env", "-c", config_file(), "--shell", "fish")
    assert code == 0
    assert "set -gx WSS_PROXY 'http://127.0.0.1:3128'\n" in out
    code, out, _ = run("env", "-c", config_file(), "--shell", "json")
    assert code == 0
    assert json.loads(out)["wss_proxy"] == "http://127.0.0.1:3128"


def _read_env(shell: str, out: str) -> dict:
    """
    The variables a C{codexproxy env} output sets, read back the way that
    shell (or a JSON reader) would.
    """
    if shell == "json":
        return json.loads(out)
    if shell == "fish":
        return {
            name: shlex.split(value)[0]
            for name, value in (line.split(" ", 3)[2:] for line in out.splitlines())
        }
    shown = subprocess.run(
        ["sh", "-c", out + "env -0"], capture_output=True, text=True, env={}
    ).stdout
    env = dict(entry.split("=", 1) for entry in shown.split("\0") if entry)
    for name in ("PWD", "SHLVL", "_", "OLDPWD"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize("shell", ["sh", "fish", "json"])
def test_env_every_format_carries_every_variable(config_file, shell):
    """
    Each shell format sets exactly the variables of SPEC §10, key by key.
    """
    code, out, _ = run("env", "-c", config_file(), "--shell", shell)
    assert code == 0
    env = _read_env(shell, out)
    http = "http://127.0.0.1:3128"
    want = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "WS_PROXY", "WSS_PROXY"):
        want[name] = want[name.lower()] = http
    want["ALL_PROXY"] = want["all_proxy"] = "socks5h://127.0.0.1:8081"
    for name in ("FTP_PROXY", "npm_config_proxy", "npm_config_https_proxy",
                 "YARN_HTTP_PROXY", "YARN_HTTPS_PROXY"):
        want[name] = http
    for name in ("NODE_USE_ENV_PROXY", "ELECTRON_GET_USE_PROXY", "CODEX_NETWORK_PROXY_ACTIVE"):
        want[name] = "1"
    want["NO_PROXY"] = want["no_proxy"] = ""
    assert env == want


def test_env_reads_bound_addresses_from_the_ports_file(config_file, tmp_path):
    path = config_file(text='[network]\nenabled = true\nproxy_url = "127.0.0.1:0"\n'
                       'socks_url = "127.0.0.1:0"\n')
    code, _, err = run("env", "-c", path)
    assert code == 1 and "ephemeral" in err
    ports = tmp_path / "ports.json"
    ports.write_text('{"http": "127.0.0.1:4100", "socks": "127.0.0.1:4101"}')
    code, out, _ = run("env", "-c", path, "--ports-file", str(ports), "--shell", "json")
    assert code == 0
    env = json.loads(out)
    assert (env["HTTP_PROXY"], env["ALL_PROXY"]) == (
        "http://127.0.0.1:4100",
        "socks5h://127.0.0.1:4101",
    )


def test_env_unreadable_ports_file_exits_1(config_file, tmp_path):
    code, _, err = run("env", "-c", config_file(), "--ports-file", str(tmp_path / "no.json"))
    assert code == 1
    assert "no.json: cannot read the ports file" in err


def test_env_disabled_exits_1(config_file):
    code, out, err = run("env", "-c", config_file(text="[network]\n"))
    assert (code, out) == (1, "")
    assert "disabled" in err


def test_env_with_mitm_points_clients_at_the_ca_bundle(config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEX_HOME", str(tmp_path / "home"))
    path = config_file(text="[network]\nenabled = true\nmitm = true\n")
    code, out, err = run("env", "--shell", "json", "-c", path)
    assert (code, err) == (0, "")
    env = json.loads(out)
    bundle = tmp_path / "home" / "proxy" / "ca-bundle.pem"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO",
                 "PIP_CERT", "CURL_CA_BUNDLE", "CARGO_HTTP_CAINFO"):
        assert env[name] == str(bundle)
    # The bundle exists and ends with the proxy's CA certificate.
    ca = (tmp_path / "home" / "proxy" / "ca.pem").read_bytes()
    assert bundle.read_bytes().rstrip().endswith(ca.rstrip())


def test_ca_creates_once_and_shows_the_same_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEX_HOME", str(tmp_path))
    code, first, err = run("ca", "--bundle", str(tmp_path / "out.pem"))
    assert (code, err) == (0, "")
    rows = fields(first)
    assert rows["certificate"] == str(tmp_path / "proxy" / "ca.pem")
    assert len(rows["sha256 fingerprint"].split(":")) == 32
    assert rows["client bundle"] == str(tmp_path / "out.pem")
    assert (tmp_path / "out.pem").read_bytes().rstrip().endswith(
        (tmp_path / "proxy" / "ca.pem").read_bytes().rstrip()
    )
    code, second, _ = run("ca")
    assert code == 0
    assert fields(second)["sha256 fingerprint"] == rows["sha256 fingerprint"]


def test_ca_refuses_a_group_readable_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEX_HOME", str(tmp_path))
    assert run("ca")[0] == 0
    (tmp_path / "proxy" / "ca.key").chmod(0o640)
    code, out, err = run("ca")
    assert code == 1
    assert "ca.key" in err


def test_module_entry_point_exit_statuses(config_file):
    """
    C{python -m codex_proxy.cli} (what the console script runs) exits with
    the statuses of L{cli.main}.
    """
    path = config_file()

    def status(*argv: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "codex_proxy.cli", *argv],
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])},
        ).returncode

    assert status("explain", "-c", path, "http://api.github.test/") == 0
    assert status("explain", "-c", path, "http://example.test/") == 1
    assert status("explain") == 2


#: A value nested deeper than the TOML parser can follow (issue 15, item 7).
NESTED = "x = " + "[" * 3000 + "]" * 3000 + "\n"


def test_check_config_of_a_deeply_nested_value_is_one_line_naming_the_file(config_file):
    path = config_file(text=NESTED)
    code, out, err = run("check-config", path)
    assert code == 1
    assert err == f"codexproxy: config error: {path}: invalid TOML: values nested too deeply\n"


def test_importing_the_command_loads_no_listener_and_no_tls():
    """
    The command reads configs; it must not pay for (or depend on) the
    listeners, Twisted or pyOpenSSL just to start.
    """
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import codex_proxy.cli, sys; print(' '.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "codex_proxy.cli" in loaded
    for module in ("codex_proxy.httpproxy", "codex_proxy.socks5", "OpenSSL", "twisted.internet.reactor"):
        assert module not in loaded
