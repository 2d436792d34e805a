"""
The operations listener's config keys (SPEC §13): C{admin_url} is loopback
only whatever the dangerous flags say, C{admin_token} / C{admin_token_file}
follow the client-token rules, and neither C{check-config}, the config's
repr nor an error message ever shows a token.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import attrs
import pytest

from codex_proxy import cli
from codex_proxy.config import ConfigError, ListenAddress, parse_config
from codex_proxy.configview import policy_document
from codex_proxy.policystate import keep_listeners

TOKEN = "admin-token-0123456789abcdef"


def parse(*lines: str) -> object:
    return parse_config(("[network]\n" + "\n".join(lines) + "\n").encode(), "cfg.toml")


def error_of(*lines: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(*lines)
    return str(caught.value)


def test_off_by_default():
    config = parse()
    assert (config.admin_listen, config.admin_token) == (None, None)


@pytest.mark.parametrize(
    "text, address",
    [
        ("127.0.0.1:3129", ListenAddress("127.0.0.1", 3129)),
        ("http://127.0.0.2:0", ListenAddress("127.0.0.2", 0)),
        ("http://localhost:3129/", ListenAddress("127.0.0.1", 3129)),
        ("[::1]:3129", ListenAddress("::1", 3129)),
    ],
)
def test_loopback_addresses(text, address):
    assert parse(f'admin_url = "{text}"').admin_listen == address


@pytest.mark.parametrize("text", ["0.0.0.0:3129", "192.0.2.1:3129", "[::]:3129"])
@pytest.mark.parametrize(
    "flags",
    [(), ("dangerously_allow_non_loopback_proxy = true",)],
)
def test_non_loopback_is_an_error_whatever_the_flags(text, flags):
    message = error_of(f'admin_url = "{text}"', *flags)
    assert message.startswith(f"cfg.toml: network.admin_url: {text} is not on loopback")
    assert "whatever dangerously_allow_non_loopback_proxy says" in message


@pytest.mark.parametrize("scheme", ["https", "socks5", "socks5h"])
def test_only_the_http_scheme(scheme):
    message = error_of(f'admin_url = "{scheme}://127.0.0.1:3129"')
    assert message.endswith("the scheme must be http")


def test_malformed_address_names_the_key():
    assert error_of('admin_url = "127.0.0.1"').startswith(
        "cfg.toml: network.admin_url: invalid listener address '127.0.0.1'"
    )


def test_inline_token_kept_out_of_repr():
    config = parse('admin_url = "127.0.0.1:3129"', f'admin_token = "{TOKEN}"')
    assert config.admin_token == TOKEN
    assert TOKEN not in repr(config)


def test_token_file(tmp_path: Path):
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    assert parse(f'admin_token_file = "{path}"').admin_token == TOKEN


def test_token_file_readable_by_others(tmp_path: Path):
    path = tmp_path / "admin.token"
    path.write_text(TOKEN)
    os.chmod(path, 0o644)
    message = error_of(f'admin_token_file = "{path}"')
    assert message.startswith("cfg.toml: network.admin_token_file:")
    assert "readable by group or others" in message and TOKEN not in message


def test_short_token_not_quoted():
    message = error_of('admin_token = "short-token"')
    assert message.startswith("cfg.toml: network.admin_token: a token needs at least")
    assert "short-token" not in message


def test_both_keys(tmp_path: Path):
    message = error_of(f'admin_token = "{TOKEN}"', f'admin_token_file = "{tmp_path}/t"')
    assert "set either admin_token or admin_token_file, not both" in message
    assert TOKEN not in message


def test_check_config_rows_never_show_the_token(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(f'[network]\nadmin_url = "127.0.0.1:3129"\nadmin_token = "{TOKEN}"\n')
    out = io.StringIO()
    assert cli.main(["check-config", str(path)], out, io.StringIO()) == 0
    text = out.getvalue()
    assert TOKEN not in text
    lines = [line.split(None, 1) for line in text.splitlines()]
    assert ["admin_url:", "127.0.0.1:3129"] in lines
    assert ["admin_token:", "set (inline admin_token)"] in lines


def test_check_config_without_the_listener(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("[network]\n")
    out = io.StringIO()
    assert cli.main(["check-config", str(path)], out, io.StringIO()) == 0
    lines = [line.split(None, 1) for line in out.getvalue().splitlines()]
    assert ["admin_url:", "unset (default)"] in lines
    assert ["admin_token:", "none"] in lines


def test_policy_document_is_what_check_config_prints():
    config = parse(
        'allowed_domains = ["a.example"]',
        'admin_url = "127.0.0.1:3129"',
        f'admin_token = "{TOKEN}"',
    )
    document = policy_document(config)
    assert TOKEN not in repr(document)
    assert document["settings"]["admin_url"] == "127.0.0.1:3129"
    assert document["allowed_domains"] == [
        {"pattern": "a.example", "source": "cfg.toml: network.allowed_domains[0]"}
    ]
    assert document["limits"]["tunnel_idle_s"] == {"value": 3600, "default": True}


def test_admin_url_cannot_change_on_a_running_proxy():
    running = parse('admin_url = "127.0.0.1:3129"')
    kept, warnings = keep_listeners(running, attrs.evolve(running, admin_listen=None))
    assert kept.admin_listen == ListenAddress("127.0.0.1", 3129)
    [warning] = warnings
    assert "network.admin_url: changed to unset" in warning
