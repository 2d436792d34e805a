"""
Tests for managed requirements (SPEC §2.4): the C{[experimental_network]}
file and its merge with a user config.
"""

from __future__ import annotations

import os

import pytest

from codex_proxy.config import ConfigError, parse_config
from codex_proxy.model import Mode, Protocol, ProxyRequest, Reason
from codex_proxy.policy import decide, policy_from_config
from codex_proxy.sources import (
    Requirements,
    load_requirements,
    merge_requirements,
    parse_requirements,
)


def user(body: str):
    """
    An enabled user config with C{body} (which may set C{enabled} itself).
    """
    prefix = "" if body.startswith("enabled") else "enabled = true\n"
    return parse_config(("[network]\n" + prefix + body).encode(), "config.toml")


def managed(body: str) -> Requirements:
    return parse_requirements(("[experimental_network]\n" + body).encode(), "req.toml")


def merged(user_body: str, managed_body: str):
    return merge_requirements(user(user_body), managed(managed_body))


def reason(config, host: str):
    request = ProxyRequest(Protocol.HTTP, host, 80, method="GET")
    return decide(policy_from_config(config, os.path.realpath), request).reason


def test_parse_every_key():
    requirements = managed(
        'allowed_domains = ["A.example", "both.example"]\n'
        'denied_domains = ["*.bad.example", "both.example"]\n'
        "managed_allowed_domains_only = true\n"
        "enabled = true\nallow_upstream_proxy = false\n"
        "dangerously_allow_non_loopback_proxy = false\nallow_local_binding = false\n"
        'dangerously_allow_all_unix_sockets = false\nmode = "limited"\n'
    )
    assert requirements.allowed_domains == ("a.example",)
    assert requirements.denied_domains == ("*.bad.example", "both.example")
    assert requirements.managed_allowed_domains_only is True
    assert dict(requirements.ceilings) == {
        "enabled": True,
        "allow_upstream_proxy": False,
        "dangerously_allow_non_loopback_proxy": False,
        "allow_local_binding": False,
        "dangerously_allow_all_unix_sockets": False,
        "mode": Mode.LIMITED,
    }
    assert requirements.pattern_sources["a.example"] == (
        "req.toml: experimental_network.allowed_domains[0]"
    )


def test_file_without_the_table_imposes_nothing():
    requirements = parse_requirements(b'allowed_sandbox_modes = ["read-only"]\n', "req.toml")
    assert requirements == Requirements(source="req.toml")


@pytest.mark.parametrize(
    "body, key, value",
    [
        ("alowed_domains = []", "experimental_network.alowed_domains", "did you mean 'allowed_domains'"),
        ("mitm = false", "experimental_network.mitm", "unknown key"),
        ('mode = "fast"', "experimental_network.mode", "'fast'"),
        ("mode = 1", "experimental_network.mode", "integer 1"),
        ('enabled = "no"', "experimental_network.enabled", "string 'no'"),
        ('managed_allowed_domains_only = 1', "experimental_network.managed_allowed_domains_only", "integer 1"),
        ('allowed_domains = ["*"]', "experimental_network.allowed_domains[0]", "'*'"),
        ('denied_domains = ["ok.example", 3]', "experimental_network.denied_domains[1]", "integer 3"),
        ('allowed_domains = "a.example"', "experimental_network.allowed_domains", "string 'a.example'"),
    ],
)
def test_invalid_requirements_name_file_key_and_value(body, key, value):
    with pytest.raises(ConfigError) as info:
        managed(body)
    message = str(info.value)
    assert message.startswith(f"req.toml: {key}: "), message
    assert value in message


def test_invalid_toml_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^req.toml: invalid TOML"):
        parse_requirements(b"[experimental_network\n", "req.toml")
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="nope.toml: cannot read requirements file"):
        load_requirements(missing)


# (user lines, managed lines, effective allowed, effective denied)
DOMAIN_MERGES = [
    pytest.param(
        'allowed_domains = ["u.example"]',
        'allowed_domains = ["m.example"]',
        ("m.example", "u.example"),
        (),
        id="allow-union",
    ),
    pytest.param(
        'denied_domains = ["u.example"]',
        'denied_domains = ["m.example"]',
        (),
        ("m.example", "u.example"),
        id="deny-union",
    ),
    pytest.param(
        'denied_domains = ["m.example"]',
        'allowed_domains = ["m.example", "n.example"]',
        ("n.example",),
        ("m.example",),
        id="user-deny-beats-managed-allow",
    ),
    pytest.param(
        'allowed_domains = ["m.example", "u.example"]',
        'denied_domains = ["m.example"]',
        ("u.example",),
        ("m.example",),
        id="managed-deny-beats-user-allow",
    ),
    pytest.param(
        'allowed_domains = ["u.example", "m.example"]\ndenied_domains = ["d.example"]',
        'allowed_domains = ["m.example"]\nmanaged_allowed_domains_only = true',
        ("m.example",),
        ("d.example",),
        id="managed-only-ignores-user-allow-keeps-user-deny",
    ),
    pytest.param(
        'allowed_domains = ["u.example"]',
        "managed_allowed_domains_only = true",
        (),
        (),
        id="managed-only-empty-allowlist",
    ),
]


@pytest.mark.parametrize("user_body, managed_body, allowed, denied", DOMAIN_MERGES)
def test_domain_merge(user_body, managed_body, allowed, denied):
    config = merged(user_body, managed_body)
    assert config.allowed_domains == allowed
    assert config.denied_domains == denied


def test_pattern_sources_say_which_file_put_each_pattern():
    config = merged(
        'allowed_domains = ["u.example", "m.example"]\ndenied_domains = ["x.example"]',
        'allowed_domains = ["m.example", "x.example"]\ndenied_domains = ["d.example"]',
    )
    assert dict(config.pattern_sources) == {
        "m.example": "req.toml: experimental_network.allowed_domains[0]",
        "u.example": "config.toml: network.allowed_domains[0]",
        "d.example": "req.toml: experimental_network.denied_domains[0]",
        "x.example": "config.toml: network.denied_domains[0]",
    }


def test_managed_only_warns_about_ignored_user_patterns_and_sets_the_flag():
    config = merged(
        'allowed_domains = ["m.example", "u.example"]',
        'allowed_domains = ["m.example"]\nmanaged_allowed_domains_only = true',
    )
    assert config.managed_allowed_domains_only is True
    assert policy_from_config(config, os.path.realpath).managed_allowed_domains_only is True
    [warning] = config.warnings
    assert warning.startswith("req.toml: experimental_network.managed_allowed_domains_only")
    assert "u.example (config.toml: network.allowed_domains[1])" in warning
    assert "m.example (" not in warning


def test_managed_only_with_empty_allowlist_blocks_everything():
    config = merged(
        'allowed_domains = ["u.example", "127.0.0.1"]', "managed_allowed_domains_only = true"
    )
    assert reason(config, "u.example") is Reason.NOT_ALLOWED
    assert reason(config, "127.0.0.1") is Reason.NOT_ALLOWED_LOCAL
    assert reason(config, "other.example") is Reason.NOT_ALLOWED


def test_no_requirements_changes_nothing():
    config = user('allowed_domains = ["u.example"]\nmode = "limited"')
    assert merge_requirements(config, Requirements()) == config


# (key, user line or None for the default, ceiling line, effective value)
CEILINGS_APPLIED = [
    ("allow_upstream_proxy", None, "allow_upstream_proxy = false", False),
    ("mode", None, 'mode = "limited"', Mode.LIMITED),
    ("allow_upstream_proxy", "allow_upstream_proxy = false", "allow_upstream_proxy = false", False),
    ("mode", 'mode = "limited"', 'mode = "limited"', Mode.LIMITED),
    ("mode", 'mode = "full"', 'mode = "full"', Mode.FULL),
    ("allow_local_binding", "allow_local_binding = true", "allow_local_binding = true", True),
    ("allow_local_binding", None, "allow_local_binding = false", False),
    ("enabled", "enabled = false", "enabled = false", False),
    ("enabled", None, "enabled = true", True),
    ("dangerously_allow_all_unix_sockets", None, "dangerously_allow_all_unix_sockets = false", False),
    ("dangerously_allow_non_loopback_proxy", None, "dangerously_allow_non_loopback_proxy = false", False),
]


@pytest.mark.parametrize("key, user_line, ceiling_line, value", CEILINGS_APPLIED)
def test_ceiling_within_or_default_takes_the_ceiling(key, user_line, ceiling_line, value):
    config = merged(user_line or "", ceiling_line)
    assert getattr(config, key) == value


# (explicit user line, ceiling line, value shown, ceiling shown)
CEILINGS_EXCEEDED = [
    ("enabled", "enabled = true", "true", "false"),
    ("allow_upstream_proxy", "allow_upstream_proxy = true", "true", "false"),
    ("dangerously_allow_non_loopback_proxy", "dangerously_allow_non_loopback_proxy = true", "true", "false"),
    ("allow_local_binding", "allow_local_binding = true", "true", "false"),
    ("dangerously_allow_all_unix_sockets", "dangerously_allow_all_unix_sockets = true", "true", "false"),
    ("mode", 'mode = "full"', '"full"', '"limited"'),
]


@pytest.mark.parametrize("key, user_line, shown, ceiling", CEILINGS_EXCEEDED)
def test_explicit_value_above_a_ceiling_names_both_files(key, user_line, shown, ceiling):
    ceiling_line = f"{key} = {ceiling}"
    with pytest.raises(ConfigError) as info:
        merged(user_line, ceiling_line)
    assert str(info.value) == (
        f"config.toml: network.{key}: {shown} exceeds the managed ceiling "
        f"req.toml: experimental_network.{key} = {ceiling}"
    )


def test_ceiling_error_names_the_profile_section():
    config = parse_config(
        b'default_permissions = "dev"\n[permissions.dev.network]\nallow_local_binding = true\n',
        "config.toml",
    )
    with pytest.raises(ConfigError, match=r"^config.toml: permissions.dev.network.allow_local_binding: "):
        merge_requirements(config, managed("allow_local_binding = false"))
