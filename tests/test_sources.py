"""
Tests for L{codex_proxy.sources}: the remembered-rules file, the layering of
user sources under managed requirements, the checks on runtime additions,
and what a reload reports (SPEC §2.4, §2.5).
"""

from __future__ import annotations

import os

import pytest

from codex_proxy.config import ConfigError, ListenAddress, parse_config
from codex_proxy.model import Mode
from codex_proxy.policystate import describe_changes, keep_listeners
from codex_proxy.sources import (
    Action,
    RememberedRules,
    RuleError,
    RuntimeRules,
    SourcePaths,
    Sources,
    check_addition,
    effective_config,
    load_rules,
    load_sources,
    parse_requirements,
    parse_rules,
    persist_rule,
    rules_path,
)


def user(body: str = ""):
    return parse_config(("[network]\nenabled = true\n" + body).encode(), "config.toml")


def managed(body: str = ""):
    return parse_requirements(("[experimental_network]\n" + body).encode(), "req.toml")


def rules(body: str) -> RememberedRules:
    return parse_rules(body.encode(), "rules.toml")


def test_rules_path_is_under_codex_home():
    assert rules_path({"CODEX_HOME": "/h"}) == "/h/proxy/network-rules.toml"
    assert rules_path({"HOME": "/u"}) == "/u/.codex/proxy/network-rules.toml"


def test_parse_rules_canonicalises_and_denies_a_pattern_in_both_lists():
    parsed = rules(
        'allowed_domains = ["A.Example.", "both.example"]\n'
        'denied_domains = ["both.example"]\n'
    )
    assert parsed.allowed_domains == ("a.example",)
    assert parsed.denied_domains == ("both.example",)
    assert parsed.pattern_sources["a.example"] == "rules.toml: allowed_domains[0]"


@pytest.mark.parametrize(
    "body, key, value",
    [
        ('allowed = ["a.example"]', "allowed", "did you mean 'allowed_domains'"),
        ('allowed_domains = ["*"]', "allowed_domains[0]", "'*'"),
        ('denied_domains = [1]', "denied_domains[0]", "integer 1"),
    ],
)
def test_invalid_rules_name_file_key_and_value(body, key, value):
    with pytest.raises(ConfigError) as info:
        rules(body)
    assert str(info.value).startswith(f"rules.toml: {key}: ")
    assert value in str(info.value)


def test_missing_rules_file_is_empty(tmp_path):
    path = str(tmp_path / "proxy" / "network-rules.toml")
    assert load_rules(path) == RememberedRules(source=path)


def test_persist_creates_the_private_directory_and_round_trips(tmp_path):
    path = str(tmp_path / "proxy" / "network-rules.toml")
    persist_rule(path, "a.example", Action.ALLOW)
    persist_rule(path, "b.example", Action.DENY)
    persisted = persist_rule(path, "b.example", Action.ALLOW)
    assert persisted.allowed_domains == ("a.example", "b.example")
    assert persisted.denied_domains == ()
    assert load_rules(path) == persisted
    assert os.stat(tmp_path / "proxy").st_mode & 0o777 == 0o700
    assert os.listdir(tmp_path / "proxy") == ["network-rules.toml"]


def test_persist_keeps_hand_edits_and_refuses_a_broken_file(tmp_path):
    path = tmp_path / "network-rules.toml"
    path.write_text('denied_domains = ["hand.example"]\n')
    persist_rule(str(path), "a.example", Action.ALLOW)
    assert load_rules(str(path)).denied_domains == ("hand.example",)
    path.write_text("allowed_domains = [\n")
    with pytest.raises(ConfigError, match="network-rules.toml: invalid TOML"):
        persist_rule(str(path), "b.example", Action.ALLOW)
    assert path.read_text() == "allowed_domains = [\n"


# (config lines, remembered rules, runtime additions, allowed, denied)
LAYERS = [
    pytest.param(
        'allowed_domains = ["c.example"]',
        'allowed_domains = ["r.example"]',
        [],
        ("c.example", "r.example"),
        (),
        id="remembered-allow-adds",
    ),
    pytest.param(
        'denied_domains = ["x.example"]',
        'allowed_domains = ["x.example"]',
        [],
        ("x.example",),
        (),
        id="remembered-allow-lifts-config-deny",
    ),
    pytest.param(
        'allowed_domains = ["x.example"]',
        'denied_domains = ["x.example"]',
        [],
        (),
        ("x.example",),
        id="remembered-deny-removes-config-allow",
    ),
    pytest.param(
        'allowed_domains = ["x.example"]',
        'allowed_domains = ["x.example"]',
        [("x.example", Action.DENY)],
        (),
        ("x.example",),
        id="runtime-deny-flips",
    ),
    pytest.param(
        'denied_domains = ["x.example"]',
        "",
        [("x.example", Action.DENY), ("x.example", Action.ALLOW)],
        ("x.example",),
        (),
        id="latest-runtime-addition-wins",
    ),
    pytest.param(
        'denied_domains = ["**.example"]',
        'allowed_domains = ["a.example"]',
        [],
        ("a.example",),
        ("**.example",),
        id="only-the-same-pattern-is-removed",
    ),
]


@pytest.mark.parametrize("config_body, rules_body, runtime, allowed, denied", LAYERS)
def test_user_layers(config_body, rules_body, runtime, allowed, denied):
    runtime_rules = RuntimeRules()
    for pattern, action in runtime:
        runtime_rules = runtime_rules.add(pattern, action)
    config = effective_config(Sources(user(config_body), remembered=rules(rules_body)), runtime_rules)
    assert config.allowed_domains == allowed
    assert config.denied_domains == denied


def test_remembered_and_runtime_entries_are_merged_under_requirements():
    sources = Sources(
        user('allowed_domains = ["c.example"]'),
        managed('allowed_domains = ["m.example"]\ndenied_domains = ["r.example"]'),
        rules('allowed_domains = ["r.example", "s.example"]'),
    )
    config = effective_config(sources, RuntimeRules().add("t.example", Action.ALLOW))
    assert config.allowed_domains == ("m.example", "c.example", "s.example", "t.example")
    assert config.denied_domains == ("r.example",)
    assert config.pattern_sources["s.example"] == "rules.toml: allowed_domains[1]"
    assert config.pattern_sources["t.example"] == "<runtime>"
    assert config.pattern_sources["r.example"] == "req.toml: experimental_network.denied_domains[0]"


def test_managed_only_ignores_remembered_allows_with_a_warning():
    sources = Sources(
        user(),
        managed('allowed_domains = ["m.example"]\nmanaged_allowed_domains_only = true'),
        rules('allowed_domains = ["r.example"]'),
    )
    config = effective_config(sources)
    assert config.allowed_domains == ("m.example",)
    assert "r.example (rules.toml: allowed_domains[0])" in config.warnings[-1]


@pytest.mark.parametrize(
    "requirements, pattern, action, expected",
    [
        ("", " A.Example. ", Action.ALLOW, "a.example"),
        ("", "*.example", Action.DENY, "*.example"),
        ("managed_allowed_domains_only = true", "a.example", Action.DENY, "a.example"),
        ('denied_domains = ["a.example"]', "**.example", Action.ALLOW, "**.example"),
        ('denied_domains = ["*.a.example"]', "a.example", Action.ALLOW, "a.example"),
        ('denied_domains = ["*.a.example"]', "**.a.example", Action.ALLOW, "**.a.example"),
        ('denied_domains = ["a.example"]', "a.example", Action.DENY, "a.example"),
        ("", " A.Example:8000 ", Action.ALLOW, "a.example:8000"),
        ("", "[::1]:9000", Action.ALLOW, "[::1]:9000"),
        ("", "*:22", Action.DENY, "*:22"),
        ('denied_domains = ["*:22"]', "a.example", Action.ALLOW, "a.example"),
        ('denied_domains = ["a.example:22"]', "a.example", Action.ALLOW, "a.example"),
        ('denied_domains = ["a.example:22"]', "a.example:443", Action.ALLOW, "a.example:443"),
    ],
)
def test_additions_accepted(requirements, pattern, action, expected):
    assert check_addition(managed(requirements), pattern, action) == expected


@pytest.mark.parametrize(
    "requirements, pattern, action, message",
    [
        ("", "*", Action.ALLOW, "cannot allow '*': the global pattern"),
        ("", "a.example:0", Action.DENY, "cannot deny 'a.example:0': invalid port"),
        ("", "*:22", Action.ALLOW, "cannot allow '*:22': '*:22' matches every host"),
        ('denied_domains = ["*:22"]', "a.example:22", Action.ALLOW, "'*:22'"),
        ('denied_domains = ["a.example"]', "a.example:443", Action.ALLOW, "'a.example'"),
        ('denied_domains = ["*.example:22"]', "*.example:22", Action.ALLOW, "'*.example:22'"),
        (
            'allowed_domains = ["a.example"]\nmanaged_allowed_domains_only = true',
            "a.example",
            Action.ALLOW,
            "cannot allow 'a.example': the allowlist is managed (req.toml: "
            "experimental_network.managed_allowed_domains_only = true)",
        ),
        (
            'denied_domains = ["a.example"]',
            "A.example",
            Action.ALLOW,
            "cannot allow 'a.example': managed requirements deny it "
            "(req.toml: experimental_network.denied_domains[0]: 'a.example')",
        ),
        ('denied_domains = ["**.example"]', "b.a.example", Action.ALLOW, "'**.example'"),
        ('denied_domains = ["*.example"]', "*.a.example", Action.ALLOW, "'*.example'"),
        ('denied_domains = ["**.example"]', "**.a.example", Action.ALLOW, "'**.example'"),
    ],
)
def test_additions_refused(requirements, pattern, action, message):
    with pytest.raises(RuleError) as info:
        check_addition(managed(requirements), pattern, action)
    assert message in str(info.value)


def test_load_sources_reads_every_file_and_checks_ceilings(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[network]\nenabled = true\nallow_local_binding = true\n')
    requirements = tmp_path / "req.toml"
    requirements.write_text("[experimental_network]\nallow_local_binding = false\n")
    paths = SourcePaths(str(config), str(requirements), str(tmp_path / "rules.toml"))
    with pytest.raises(ConfigError) as info:
        load_sources(paths)
    assert "config.toml: network.allow_local_binding: true exceeds" in str(info.value)
    assert "req.toml: experimental_network.allow_local_binding = false" in str(info.value)
    requirements.write_text("[experimental_network]\nallow_local_binding = true\n")
    assert load_sources(paths).config.allow_local_binding is True


def test_keep_listeners_refuses_listener_and_limit_changes():
    running = user('proxy_url = "127.0.0.1:3128"')
    new = user(
        'proxy_url = "127.0.0.1:4000"\nenable_socks5 = false\nmode = "limited"\n'
        "[network.limits]\ntunnel_idle_s = 5\n"
    )
    kept, warnings = keep_listeners(running, new)
    assert kept.http_listen == ListenAddress("127.0.0.1", 3128)
    assert kept.enable_socks5 is True
    assert kept.limits == running.limits
    assert kept.mode is Mode.LIMITED
    assert [w.split(":")[1].strip() for w in warnings] == [
        "network.proxy_url",
        "network.enable_socks5",
        "network.limits",
    ]
    assert "changed to 127.0.0.1:4000" in warnings[0]
    assert "keeping 127.0.0.1:3128 until restart" in warnings[0]


def test_describe_changes():
    old = user('allowed_domains = ["a.example", "b.example"]')
    new = user(
        'allowed_domains = ["b.example", "c.example"]\n'
        'denied_domains = ["a.example"]\nmode = "limited"'
    )
    assert describe_changes(old, new) == (
        "allowed_domains +c.example -a.example",
        "denied_domains +a.example",
        "mode 'full' -> 'limited'",
    )
    assert describe_changes(old, old) == ()
