"""
The child-process environment of SPEC §10.
"""

from __future__ import annotations

import pytest

from codex_proxy.childenv import CA_BUNDLE_VARIABLES, EnvError, child_env
from codex_proxy.config import parse_config


def config(extra: str = ""):
    return parse_config(f"[network]\nenabled = true\n{extra}".encode(), "c.toml")


def test_proxy_variables_in_both_cases_point_at_the_http_listener():
    env = child_env(config('proxy_url = "127.0.0.1:3130"\n'))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "WS_PROXY", "WSS_PROXY"):
        assert env[name] == env[name.lower()] == "http://127.0.0.1:3130"
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://127.0.0.1:8081"
    assert env["NO_PROXY"] == env["no_proxy"] == ""
    assert not set(CA_BUNDLE_VARIABLES) & set(env)


def expected(http: str, all_proxy: str, no_proxy: str = "") -> dict:
    """
    Every variable of SPEC §10 without a CA bundle, key by key.
    """
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "WS_PROXY", "WSS_PROXY"):
        env[name] = env[name.lower()] = http
    env["ALL_PROXY"] = env["all_proxy"] = all_proxy
    for name in (
        "FTP_PROXY",
        "npm_config_proxy",
        "npm_config_https_proxy",
        "YARN_HTTP_PROXY",
        "YARN_HTTPS_PROXY",
    ):
        env[name] = http
    for name in ("NODE_USE_ENV_PROXY", "ELECTRON_GET_USE_PROXY", "CODEX_NETWORK_PROXY_ACTIVE"):
        env[name] = "1"
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    return env


def test_every_variable_key_by_key_with_socks5():
    env = child_env(config('proxy_url = "127.0.0.1:3130"\n'))
    assert env == expected("http://127.0.0.1:3130", "socks5h://127.0.0.1:8081")


def test_all_proxy_is_the_http_url_without_socks5():
    env = child_env(config("enable_socks5 = false\n"))
    assert env == expected("http://127.0.0.1:3128", "http://127.0.0.1:3128")


def test_local_binding_lets_loopback_bypass_the_proxy():
    env = child_env(config("allow_local_binding = true\n"))
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"


def test_bound_addresses_win_and_ipv6_keeps_brackets():
    env = child_env(
        config('proxy_url = "[::1]:0"\nsocks_url = "127.0.0.1:0"\n'),
        http="[::1]:4000",
        socks="127.0.0.1:4001",
    )
    assert env["HTTP_PROXY"] == "http://[::1]:4000"
    assert env["ALL_PROXY"] == "socks5h://127.0.0.1:4001"


def test_ephemeral_port_without_a_bound_address_is_an_error():
    with pytest.raises(EnvError, match=r"c.toml: proxy_url .*ephemeral"):
        child_env(config('proxy_url = "127.0.0.1:0"\n'))


def test_disabled_proxy_has_no_environment():
    with pytest.raises(EnvError, match="disabled"):
        child_env(parse_config(b"[network]\nenabled = false\n", "c.toml"))


def test_ca_bundle_sets_every_bundle_variable():
    env = child_env(config("mitm = true\n"), ca_bundle="/h/proxy/bundle.pem")
    assert {name: env[name] for name in CA_BUNDLE_VARIABLES} == dict.fromkeys(
        CA_BUNDLE_VARIABLES, "/h/proxy/bundle.pem"
    )


def test_the_dns_listener_adds_nothing():
    """
    Resolvers are not configured by environment (SPEC §14.2): the sandbox's
    resolver is pointed at the DNS listener some other way.
    """
    env = child_env(config('dns_url = "127.0.0.1:5353"\n'))
    assert env == expected("http://127.0.0.1:3128", "socks5h://127.0.0.1:8081")
