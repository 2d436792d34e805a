"""
Tests for L{codex_proxy.config}: what a user's C{config.toml} turns into, and
the one-line message they get when it is wrong (SPEC §2.1-§2.3, §2.6).
"""

from __future__ import annotations

import pytest

from codex_proxy.config import (
    ConfigError,
    Limits,
    ListenAddress,
    ProxyConfig,
    default_config_path,
    load_config,
    parse_config,
)
from codex_proxy.model import Mode


def parse(text: str) -> ProxyConfig:
    return parse_config(text.encode("utf-8"), "config.toml")


def network(body: str) -> ProxyConfig:
    return parse("[network]\n" + body)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def assert_error(text: str, key: str, value: str) -> str:
    """
    Parsing C{text} fails with one line naming the file, C{key} and C{value}.
    """
    message = error(text)
    assert message.startswith(f"config.toml: {key}: "), message
    assert value in message, message
    assert "\n" not in message
    return message


DEFAULTS = [
    ("enabled", False),
    ("http_listen", ListenAddress("127.0.0.1", 3128)),
    ("enable_socks5", True),
    ("socks_listen", ListenAddress("127.0.0.1", 8081)),
    ("enable_socks5_udp", True),
    ("allow_upstream_proxy", True),
    ("dangerously_allow_non_loopback_proxy", False),
    ("mode", Mode.FULL),
    ("mitm", False),
    ("allowed_domains", ()),
    ("denied_domains", ()),
    ("allow_local_binding", False),
    ("allow_unix_sockets", ()),
    ("dangerously_allow_all_unix_sockets", False),
    ("limits", Limits()),
    ("pattern_sources", {}),
    ("warnings", ()),
    ("explicit", frozenset()),
]

LIMIT_DEFAULTS = [
    ("max_request_line_bytes", 8192),
    ("max_header_bytes", 65536),
    ("max_header_fields", 100),
    ("header_timeout_s", 30),
    ("keepalive_idle_s", 120),
    ("connect_timeout_s", 10),
    ("socks_handshake_timeout_s", 10),
    ("tunnel_idle_s", 3600),
    ("response_timeout_s", 300),
    ("max_connections", 4096),
    ("max_udp_associations", 256),
    ("decider_timeout_s", 30),
]


@pytest.mark.parametrize("field, expected", DEFAULTS)
def test_default(field, expected):
    """
    Every key has its SPEC default, with no file and with an empty section.
    """
    assert getattr(ProxyConfig.default(), field) == expected
    assert getattr(network(""), field) == expected


@pytest.mark.parametrize("field, expected", LIMIT_DEFAULTS)
def test_limit_default(field, expected):
    assert getattr(ProxyConfig.default().limits, field) == expected


def test_default_source():
    assert ProxyConfig.default().source == "<defaults>"
    assert network("").source == "config.toml"


@pytest.mark.parametrize(
    "line, field, expected",
    [
        ("enabled = true", "enabled", True),
        (
            'proxy_url = "http://127.0.0.1:9000"',
            "http_listen",
            ListenAddress("127.0.0.1", 9000),
        ),
        ("enable_socks5 = false", "enable_socks5", False),
        (
            'socks_url = "127.0.0.2:1080"',
            "socks_listen",
            ListenAddress("127.0.0.2", 1080),
        ),
        ("enable_socks5_udp = false", "enable_socks5_udp", False),
        ("allow_upstream_proxy = false", "allow_upstream_proxy", False),
        (
            "dangerously_allow_non_loopback_proxy = true",
            "dangerously_allow_non_loopback_proxy",
            True,
        ),
        ('mode = "limited"', "mode", Mode.LIMITED),
        ('mode = "full"', "mode", Mode.FULL),
        ("mitm = true", "mitm", True),
        (
            'allowed_domains = ["example.com", "*.Example.ORG"]',
            "allowed_domains",
            ("example.com", "*.example.org"),
        ),
        ('denied_domains = ["**.evil.com"]', "denied_domains", ("**.evil.com",)),
        ("allow_local_binding = true", "allow_local_binding", True),
        (
            'allow_unix_sockets = ["/run/a.sock", "/tmp/b.sock", "/run/a.sock"]',
            "allow_unix_sockets",
            ("/run/a.sock", "/tmp/b.sock"),
        ),
        (
            "dangerously_allow_all_unix_sockets = true",
            "dangerously_allow_all_unix_sockets",
            True,
        ),
    ],
)
def test_key_set(line, field, expected):
    """
    Each key, when set, changes its field and is recorded as explicit.
    """
    config = network(line)
    assert getattr(config, field) == expected
    assert config.explicit == {line.split(" ")[0]}


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_request_line_bytes", 100),
        ("max_header_bytes", 1024),
        ("max_header_fields", 5),
        ("header_timeout_s", 2.5),
        ("keepalive_idle_s", 1),
        ("connect_timeout_s", 0.25),
        ("socks_handshake_timeout_s", 3),
        ("tunnel_idle_s", 60),
        ("response_timeout_s", 45),
        ("max_connections", 8),
        ("max_udp_associations", 2),
        ("decider_timeout_s", 0.5),
    ],
)
def test_limit_set(field, value):
    config = network(f"limits = {{ {field} = {value} }}")
    assert getattr(config.limits, field) == value
    assert config.explicit == {"limits"}


def test_ignores_other_tables():
    """
    The file is codex's own config: keys outside the network section are not
    ours to judge.
    """
    config = parse(
        'model = "o3"\nwhatever = 3\n[tui]\ncolour = true\n[network]\nenabled = true\n'
    )
    assert config.enabled is True


BODY = (
    "enabled = true\n"
    'allowed_domains = ["example.com"]\n'
    "limits = { max_connections = 7 }\n"
)


@pytest.mark.parametrize(
    "text, prefix",
    [
        ("[network]\n" + BODY, "network"),
        (
            'default_permissions = "dev"\n[permissions.dev.network]\n' + BODY,
            "permissions.dev.network",
        ),
        (
            'default_permissions = "dev"\n[network]\nenabled = false\n'
            "[permissions.other.network]\nmitm = true\n"
            "[permissions.dev.network]\n" + BODY,
            "permissions.dev.network",
        ),
    ],
)
def test_section_forms(text, prefix):
    """
    The legacy table and a selected profile read the same way; a selected
    profile wins over the legacy table and over other profiles.
    """
    config = parse(text)
    assert config.enabled is True
    assert config.mitm is False
    assert config.allowed_domains == ("example.com",)
    assert config.limits.max_connections == 7
    assert config.pattern_sources == {
        "example.com": f"config.toml: {prefix}.allowed_domains[0]"
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        'model = "o3"\n',
        'default_permissions = "dev"\n[permissions.dev]\nfilesystem = "ro"\n',
        'default_permissions = "dev"\n[permissions.dev]\n[network]\nenabled = true\n',
    ],
)
def test_no_section_is_defaults(text):
    """
    No network section (or a selected profile without one) means defaults:
    the proxy is disabled.
    """
    assert parse(text) == ProxyConfig(source="config.toml")


@pytest.mark.parametrize(
    "text, value",
    [
        ('default_permissions = "dev"\n[network]\nenabled = true\n', "'dev'"),
        ('default_permissions = "dev"\n[permissions.prod.network]\n', "'dev'"),
        ("default_permissions = 3\n", "integer 3"),
    ],
)
def test_profile_selection_errors(text, value):
    assert_error(text, "default_permissions", value)


def test_profile_not_a_table():
    assert_error(
        'default_permissions = "dev"\npermissions = { dev = 1 }\n',
        "permissions.dev",
        "integer 1",
    )


def test_network_not_a_table():
    assert_error("network = true\n", "network", "boolean true")


@pytest.mark.parametrize(
    "key", [name for name, default in DEFAULTS if isinstance(default, bool)]
)
def test_bool_type_errors(key):
    """
    Booleans must be TOML booleans: "true" and 1 are refused.
    """
    assert_error(f'[network]\n{key} = "true"\n', f"network.{key}", "string 'true'")
    message = assert_error(f"[network]\n{key} = 1\n", f"network.{key}", "integer 1")
    assert "expected a boolean" in message


@pytest.mark.parametrize(
    "line, key, value, expected",
    [
        ("proxy_url = 3128", "network.proxy_url", "integer 3128", "a string"),
        ("socks_url = true", "network.socks_url", "boolean true", "a string"),
        ("mode = 1", "network.mode", "integer 1", "a string"),
        (
            'allowed_domains = "example.com"',
            "network.allowed_domains",
            "string 'example.com'",
            "an array of strings",
        ),
        (
            'denied_domains = ["a.com", 3]',
            "network.denied_domains[1]",
            "integer 3",
            "a string",
        ),
        (
            "allow_unix_sockets = [[]]",
            "network.allow_unix_sockets[0]",
            "array []",
            "a string",
        ),
        (
            'domains = ["example.com"]',
            "network.domains",
            "array ['example.com']",
            "a table",
        ),
        (
            'domains = { "example.com" = true }',
            'network.domains."example.com"',
            "boolean true",
            "a string",
        ),
        ("limits = 5", "network.limits", "integer 5", "a table"),
        (
            'limits = { max_connections = "5" }',
            "network.limits.max_connections",
            "string '5'",
            "an integer > 0",
        ),
        (
            "limits = { max_connections = 1.5 }",
            "network.limits.max_connections",
            "float 1.5",
            "an integer > 0",
        ),
        (
            "limits = { max_connections = 0 }",
            "network.limits.max_connections",
            "integer 0",
            "an integer > 0",
        ),
        (
            "limits = { max_header_bytes = -1 }",
            "network.limits.max_header_bytes",
            "integer -1",
            "an integer > 0",
        ),
        (
            "limits = { max_udp_associations = true }",
            "network.limits.max_udp_associations",
            "boolean true",
            "an integer > 0",
        ),
        (
            "limits = { tunnel_idle_s = 0 }",
            "network.limits.tunnel_idle_s",
            "integer 0",
            "a number of seconds > 0",
        ),
        (
            "limits = { header_timeout_s = -0.5 }",
            "network.limits.header_timeout_s",
            "float -0.5",
            "a number of seconds > 0",
        ),
        (
            "limits = { decider_timeout_s = inf }",
            "network.limits.decider_timeout_s",
            "float inf",
            "a number of seconds > 0",
        ),
        (
            'limits = { connect_timeout_s = "10" }',
            "network.limits.connect_timeout_s",
            "string '10'",
            "a number of seconds > 0",
        ),
    ],
)
def test_type_errors(line, key, value, expected):
    message = assert_error(f"[network]\n{line}\n", key, value)
    assert f"expected {expected}, got" in message


@pytest.mark.parametrize(
    "text, key, hint",
    [
        (
            '[network]\nallowd_domains = ["a.com"]\n',
            "network.allowd_domains",
            "did you mean 'allowed_domains'?",
        ),
        (
            "[network]\nenable_sock5 = true\n",
            "network.enable_sock5",
            "did you mean 'enable_socks5'?",
        ),
        (
            "[network]\nlimits = { max_conections = 5 }\n",
            "network.limits.max_conections",
            "did you mean 'max_connections'?",
        ),
        (
            'default_permissions = "dev"\n[permissions.dev.network]\nmitn = true\n',
            "permissions.dev.network.mitn",
            "did you mean 'mitm'?",
        ),
        ("[network]\nzzz = 1\n", "network.zzz", "known keys: enabled,"),
    ],
)
def test_unknown_key(text, key, hint):
    message = assert_error(text, key, "unknown key")
    assert hint in message


def test_mode_unknown_value():
    message = error('[network]\nmode = "fast"\n')
    assert message == (
        "config.toml: network.mode: unknown value 'fast' (expected 'full' or 'limited')"
    )


@pytest.mark.parametrize(
    "text, key, value",
    [
        ('allowed_domains = ["example.com", "*"]', "network.allowed_domains[1]", "'*'"),
        (
            'denied_domains = ["a.com", "b.com", "**"]',
            "network.denied_domains[2]",
            "'**'",
        ),
        (
            'allowed_domains = ["foo.*.com"]',
            "network.allowed_domains[0]",
            "'foo.*.com'",
        ),
        (
            'allowed_domains = ["exa mple.com"]',
            "network.allowed_domains[0]",
            "'exa mple.com'",
        ),
        ('allowed_domains = ["a..com"]', "network.allowed_domains[0]", "'a..com'"),
        ('domains = { "*" = "allow" }', 'network.domains."*"', "'*'"),
    ],
)
def test_bad_patterns(text, key, value):
    assert_error(f"[network]\n{text}\n", key, value)


def test_bad_pattern_in_profile():
    assert_error(
        'default_permissions = "dev"\n[permissions.dev.network]\n'
        'allowed_domains = ["a.com", "*"]\n',
        "permissions.dev.network.allowed_domains[1]",
        "'*'",
    )


def test_domains_map_bad_action():
    message = assert_error(
        '[network]\ndomains = { "example.com" = "block" }\n',
        'network.domains."example.com"',
        "'block'",
    )
    assert "expected 'allow' or 'deny'" in message


def test_domains_merge():
    """
    The lists and the map merge in order without duplicates; a pattern both
    allowed and denied is only denied; each pattern remembers where it came
    from.
    """
    config = network(
        'allowed_domains = ["a.com", "b.com", "A.com", "c.com"]\n'
        'denied_domains = ["x.com"]\n'
        'domains = { "d.com" = "allow", "b.com" = "deny", "a.com" = "allow", '
        '"y.com" = "deny" }\n'
    )
    assert config.allowed_domains == ("a.com", "c.com", "d.com")
    assert config.denied_domains == ("x.com", "b.com", "y.com")
    assert config.pattern_sources == {
        "a.com": "config.toml: network.allowed_domains[0]",
        "c.com": "config.toml: network.allowed_domains[3]",
        "d.com": 'config.toml: network.domains."d.com"',
        "x.com": "config.toml: network.denied_domains[0]",
        "b.com": 'config.toml: network.domains."b.com"',
        "y.com": 'config.toml: network.domains."y.com"',
    }


def test_relative_unix_socket():
    message = assert_error(
        '[network]\nallow_unix_sockets = ["/run/ok.sock", "run/docker.sock"]\n',
        "network.allow_unix_sockets[1]",
        "'run/docker.sock'",
    )
    assert "absolute" in message


@pytest.mark.parametrize(
    "url, expected, shown",
    [
        ("127.0.0.1:3128", ListenAddress("127.0.0.1", 3128), "127.0.0.1:3128"),
        ("http://127.0.0.1:0", ListenAddress("127.0.0.1", 0), "127.0.0.1:0"),
        (
            "https://127.0.0.1:65535/",
            ListenAddress("127.0.0.1", 65535),
            "127.0.0.1:65535",
        ),
        ("socks5://localhost:1080", ListenAddress("127.0.0.1", 1080), "127.0.0.1:1080"),
        (
            "SOCKS5H://LocalHost:1080",
            ListenAddress("127.0.0.1", 1080),
            "127.0.0.1:1080",
        ),
        ("http://[::1]:3128", ListenAddress("::1", 3128), "[::1]:3128"),
        ("[0:0::1]:3128", ListenAddress("::1", 3128), "[::1]:3128"),
        ("  http://127.9.8.7:80  ", ListenAddress("127.9.8.7", 80), "127.9.8.7:80"),
    ],
)
def test_listener_url_ok(url, expected, shown):
    config = network(f'proxy_url = "{url}"\nsocks_url = "{url}"\n')
    assert config.http_listen == expected
    assert config.socks_listen == expected
    assert str(config.http_listen) == shown
    assert config.warnings == ()


@pytest.mark.parametrize(
    "url, reason",
    [
        ("", "port"),
        ("127.0.0.1", "port"),
        ("http://127.0.0.1", "port"),
        ("127.0.0.1:", "port"),
        ("127.0.0.1:65536", "port"),
        ("127.0.0.1:-1", "port"),
        ("127.0.0.1:http", "port"),
        ("example.com:3128", "IP address or 'localhost'"),
        ("http://proxy.local:3128", "IP address or 'localhost'"),
        ("127.1:3128", "IP address or 'localhost'"),
        ("::1:3128", "brackets"),
        ("[127.0.0.1]:3128", "brackets"),
        ("[::1]3128", "[IPv6]:port"),
        ("[::1:3128", "[IPv6]:port"),
        ("ftp://127.0.0.1:21", "scheme"),
        ("http://127.0.0.1:3128/proxy", "'/proxy'"),
        ("http://127.0.0.1:3128?x=1", "'?x=1'"),
        ("http://user:pw@127.0.0.1:3128", "credentials"),
    ],
)
@pytest.mark.parametrize("key", ["proxy_url", "socks_url"])
def test_listener_url_bad(url, reason, key):
    message = assert_error(f'[network]\n{key} = "{url}"\n', f"network.{key}", repr(url))
    assert reason in message.split(repr(url), 1)[1]



def test_listener_url_with_a_line_break_after_the_path_is_a_config_error():
    message = assert_error(
        '[network]\nproxy_url = "127.0.0.1:3128/\\nx"\n',
        "network.proxy_url",
        "'127.0.0.1:3128/\\nx'",
    )
    assert "unexpected '/\\nx' after host:port" in message

def test_clamp_non_loopback():
    """
    A non-loopback listener is moved to 127.0.0.1 on the same port, with a
    warning naming the key.
    """
    config = network('proxy_url = "0.0.0.0:3128"\nsocks_url = "[::]:1080"\n')
    assert config.http_listen == ListenAddress("127.0.0.1", 3128)
    assert config.socks_listen == ListenAddress("127.0.0.1", 1080)
    assert len(config.warnings) == 2
    assert config.warnings[0].startswith("config.toml: network.proxy_url: ")
    assert "0.0.0.0:3128" in config.warnings[0]
    assert config.warnings[1].startswith("config.toml: network.socks_url: ")
    assert "[::]:1080" in config.warnings[1]
    assert not any("DANGEROUS" in w for w in config.warnings)


def test_clamp_dangerous_override():
    config = network(
        'dangerously_allow_non_loopback_proxy = true\nproxy_url = "10.1.2.3:3128"\n'
    )
    assert config.http_listen == ListenAddress("10.1.2.3", 3128)
    assert config.socks_listen == ListenAddress("127.0.0.1", 8081)
    [warning] = config.warnings
    assert warning.startswith("config.toml: network.proxy_url: ")
    assert "DANGEROUS" in warning
    assert "10.1.2.3:3128" in warning


@pytest.mark.parametrize(
    "unix",
    [
        'allow_unix_sockets = ["/run/docker.sock"]',
        "dangerously_allow_all_unix_sockets = true",
    ],
)
def test_clamp_with_unix_sockets(unix):
    """
    Allowing unix sockets forces loopback even with the dangerous override.
    """
    config = parse(
        'default_permissions = "dev"\n[permissions.dev.network]\n'
        "dangerously_allow_non_loopback_proxy = true\n"
        f'proxy_url = "192.168.1.5:3128"\n{unix}\n'
    )
    assert config.http_listen == ListenAddress("127.0.0.1", 3128)
    [warning] = config.warnings
    assert warning.startswith("config.toml: permissions.dev.network.proxy_url: ")
    assert "unix sockets" in warning
    assert "DANGEROUS" not in warning


def test_toml_syntax_error():
    message = error("[network]\nenabled = \n")
    assert message.startswith("config.toml: invalid TOML: ")
    assert "line 2" in message


def test_not_utf8():
    with pytest.raises(ConfigError) as info:
        parse_config(b"[network]\nmode = '\xff'\n", "config.toml")
    assert str(info.value).startswith("config.toml: not valid UTF-8")


def test_load_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[network]\nenabled = true\n")
    config = load_config(str(path))
    assert config.enabled is True
    assert config.source == str(path)


def test_load_config_error_names_path(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[network]\nmode = "fast"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: network.mode: ")


def test_load_config_missing(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"HOME": "/home/u"}, "/home/u/.codex/config.toml"),
        ({"HOME": "/home/u", "CODEX_HOME": "/etc/codex"}, "/etc/codex/config.toml"),
        ({"HOME": "/home/u", "CODEX_HOME": "~/c"}, "/home/u/c/config.toml"),
        ({"CODEX_HOME": "/etc/codex"}, "/etc/codex/config.toml"),
    ],
)
def test_default_config_path(environ, expected):
    assert default_config_path(environ) == expected


def test_default_config_path_no_home():
    with pytest.raises(ConfigError) as info:
        default_config_path({})
    assert "HOME" in str(info.value)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("127.0.0.1:5353", ListenAddress("127.0.0.1", 5353)),
        ("dns://localhost:0", ListenAddress("127.0.0.1", 0)),
        ("udp://[::1]:53", ListenAddress("::1", 53)),
    ],
)
def test_dns_url_any_scheme_is_ignored(url, expected):
    assert network(f'dns_url = "{url}"\n').dns_listen == expected


def test_dns_url_is_unset_by_default():
    assert network("").dns_listen is None


@pytest.mark.parametrize("dangerous", ["", "dangerously_allow_non_loopback_proxy = true\n"])
def test_dns_url_must_be_on_loopback(dangerous):
    message = assert_error(
        f'[network]\n{dangerous}dns_url = "0.0.0.0:53"\n', "network.dns_url", "0.0.0.0:53"
    )
    assert "loopback" in message


def test_dns_url_bad_address_names_the_key():
    assert_error('[network]\ndns_url = "resolver:53"\n', "network.dns_url", "'resolver:53'")
