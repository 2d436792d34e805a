"""
Ports in patterns and address ranges as the config files spell them: the
network section, managed requirements, remembered rules, and what
C{check-config} and C{explain} show (SPEC §2.2, §2.4, §3.1, §5.3).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from codex_proxy import cli
from codex_proxy.config import ConfigError, parse_config
from codex_proxy.sources import Sources, effective_config, parse_requirements, parse_rules


def user(body: str):
    return parse_config(("[network]\nenabled = true\n" + body).encode(), "config.toml")


def managed(body: str):
    return parse_requirements(("[experimental_network]\n" + body).encode(), "req.toml")


def error(parse, body: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(body)
    return str(info.value)


def test_ranges_are_canonical_with_their_sources():
    config = user(
        'allowed_ranges = ["10.20.0.0/16", "10.0.0.1", "FD00:1::/48", "10.20.0.0/16"]\n'
        'denied_ranges = ["203.0.113.0/24"]\n'
    )
    assert config.allowed_ranges == ("10.20.0.0/16", "10.0.0.1/32", "fd00:1::/48")
    assert config.denied_ranges == ("203.0.113.0/24",)
    assert config.pattern_sources["10.0.0.1/32"] == "config.toml: network.allowed_ranges[1]"
    assert config.pattern_sources["203.0.113.0/24"] == "config.toml: network.denied_ranges[0]"


@pytest.mark.parametrize(
    "body, message",
    [
        (
            'allowed_ranges = ["10.20.0.1/16"]',
            "config.toml: network.allowed_ranges[0]: invalid address range"
            " '10.20.0.1/16': 10.20.0.1/16 has host bits set",
        ),
        ('denied_ranges = ["10.0.0.0/33"]', "network.denied_ranges[0]: invalid address range '10.0.0.0/33'"),
        ('denied_ranges = ["fd00::/129"]', "network.denied_ranges[0]: invalid address range 'fd00::/129'"),
        ('allowed_ranges = ["a.example"]', "network.allowed_ranges[0]: invalid address range 'a.example'"),
        ('allowed_ranges = ["ok", 5]', "network.allowed_ranges[1]: expected a string, got integer 5"),
        ('allowed_ranges = "10.0.0.0/8"', "network.allowed_ranges: expected an array of strings"),
        ('allowed_domains = ["*:22"]', "network.allowed_domains[0]: '*:22' matches every host"),
        ('allowed_domains = ["a.example:0"]', "network.allowed_domains[0]: invalid port"),
        ('denied_domains = ["a.example:65536"]', "network.denied_domains[0]: invalid port"),
        ('denied_domains = ["::1:22"]', ""),  # an IPv6 literal, not a port: valid
        ('[network.domains]\n"*:25" = "allow"', 'network.domains."*:25": \'*:25\' matches every host'),
    ],
)
def test_invalid_ranges_and_port_patterns_name_the_entry(body, message):
    if not message:
        assert user(body).denied_domains == ("::1:22",)
        return
    assert message in error(user, body)


def test_port_patterns_in_every_list_and_the_map():
    config = user(
        'allowed_domains = ["localhost:8000", "[::1]:9000", "**.Example.com:443"]\n'
        'denied_domains = ["*:22"]\n'
        '[network.domains]\n"*:25" = "deny"\n"127.0.0.1:5432" = "allow"\n'
    )
    assert config.allowed_domains == (
        "localhost:8000",
        "[::1]:9000",
        "**.example.com:443",
        "127.0.0.1:5432",
    )
    assert config.denied_domains == ("*:22", "*:25")


def test_managed_ranges_merge_like_denied_domains():
    config = effective_config(
        Sources(
            user('allowed_ranges = ["10.20.0.0/16"]\ndenied_ranges = ["198.51.99.0/24"]\n'),
            managed('allowed_ranges = ["10.30.0.0/16"]\ndenied_ranges = ["203.0.113.0/24"]\n'),
        )
    )
    assert config.allowed_ranges == ("10.30.0.0/16", "10.20.0.0/16")
    assert config.denied_ranges == ("203.0.113.0/24", "198.51.99.0/24")
    assert config.pattern_sources["203.0.113.0/24"] == "req.toml: experimental_network.denied_ranges[0]"


def test_user_allowed_ranges_are_ignored_under_managed_allowed_domains_only():
    config = effective_config(
        Sources(
            user('allowed_ranges = ["10.20.0.0/16"]\n'),
            managed(
                'managed_allowed_domains_only = true\nallowed_domains = ["a.example"]\n'
                'allowed_ranges = ["10.30.0.0/16"]\n'
            ),
        )
    )
    assert config.allowed_ranges == ("10.30.0.0/16",)
    assert any(
        "ignoring allowed_ranges" in w and "10.20.0.0/16 (config.toml: network.allowed_ranges[0])" in w
        for w in config.warnings
    )


def test_managed_range_errors_name_the_requirements_file():
    message = error(managed, 'denied_ranges = ["10.0.0.1/8"]')
    assert message.startswith("req.toml: experimental_network.denied_ranges[0]: ")


def test_remembered_rules_carry_ports():
    rules = parse_rules(
        b'allowed_domains = ["localhost:8000"]\ndenied_domains = ["*:22"]\n', "rules.toml"
    )
    assert (rules.allowed_domains, rules.denied_domains) == (("localhost:8000",), ("*:22",))


CONFIG = """\
[network]
enabled = true
allowed_domains = ["localhost:8000", "**.example.test"]
denied_domains = ["*:22"]
allowed_ranges = ["10.20.0.0/16"]
denied_ranges = ["198.51.99.0/24"]
"""


def test_check_config_lists_ranges_and_port_patterns(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    stdout = io.StringIO()
    assert cli.main(["check-config", str(path)], stdout, io.StringIO()) == 0
    out = stdout.getvalue()
    lines = [line.split() for line in out.splitlines()]
    assert "allowed_ranges (1):" in out and "denied_ranges (1):" in out
    assert ["10.20.0.0/16", f"{path}:", "network.allowed_ranges[0]"] in lines
    assert ["198.51.99.0/24", f"{path}:", "network.denied_ranges[0]"] in lines
    assert ["localhost:8000", f"{path}:", "network.allowed_domains[0]"] in lines
    assert ["*:22", f"{path}:", "network.denied_domains[0]"] in lines


@pytest.mark.parametrize(
    "target, code, matched",
    [
        ("ssh.example.test:22", 1, 'denied_domains pattern "*:22"'),
        ("http://localhost:8000/", 0, 'allowed_domains pattern "localhost:8000"'),
        ("http://localhost:8001/", 1, "no pattern"),
        ("198.51.99.7:443", 1, 'denied_ranges entry "198.51.99.0/24"'),
    ],
)
def test_explain_shows_the_port_and_the_range_that_matched(tmp_path, target, code, matched):
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.replace('"**.example.test"', '"**.example.test", "198.51.99.7"'))
    stdout = io.StringIO()
    assert cli.main(["explain", "-c", str(path), target], stdout, io.StringIO()) == code
    rows = dict(line.split(":", 1) for line in stdout.getvalue().splitlines()[1:])
    assert rows["matched"].strip().startswith(matched)
