"""
The effective policy of a config as an operator reads it: one document
that C{codexproxy check-config} prints as text and the operations
listener's C{/policy} serves as JSON (SPEC §10, §13), so both always show
the same thing. It never holds a token: only whether one is set and from
which key.

Pure core: a L{ProxyConfig} in, plain values out.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple, Union

import attrs

from codex_proxy.clients import Client
from codex_proxy.config import ProxyConfig


def settings(config: ProxyConfig) -> List[Tuple[str, str]]:
    """
    The scalar settings as C{(key, shown value)} rows, in the order
    C{check-config} prints them; a value the file does not set says
    C{(default)}.
    """
    return [
        ("section", f"[{config.section}]"),
        ("enabled", _flag(config, "enabled")),
        ("proxy_url", _setting(config, "proxy_url", str(config.http_listen))),
        ("enable_socks5", _flag(config, "enable_socks5")),
        ("socks_url", _setting(config, "socks_url", str(config.socks_listen))),
        ("enable_socks5_udp", _flag(config, "enable_socks5_udp")),
        ("dns_url", _setting(config, "dns_url", str(config.dns_listen or "unset"))),
        ("mode", _setting(config, "mode", config.mode.value)),
        ("mitm", _flag(config, "mitm")),
        ("allow_local_binding", _flag(config, "allow_local_binding")),
        ("allow_upstream_proxy", _flag(config, "allow_upstream_proxy")),
        (
            "dangerously_allow_non_loopback_proxy",
            _flag(config, "dangerously_allow_non_loopback_proxy"),
        ),
        (
            "dangerously_allow_all_unix_sockets",
            _flag(config, "dangerously_allow_all_unix_sockets"),
        ),
        (
            "dangerously_allow_plaintext_secrets",
            _flag(config, "dangerously_allow_plaintext_secrets"),
        ),
        ("admin_url", _setting(config, "admin_url", str(config.admin_listen or "unset"))),
        ("admin_token", _token(config)),
    ]


def _setting(config: ProxyConfig, key: str, value: str) -> str:
    return value if key in config.explicit else f"{value} (default)"


def _flag(config: ProxyConfig, key: str) -> str:
    return _setting(config, key, str(getattr(config, key)).lower())


def _token(config: ProxyConfig) -> str:
    """
    Whether the operations token is set and by which key; never its value.
    """
    if config.admin_token is None:
        return "none"
    if "admin_token_file" in config.explicit:
        return "set (from admin_token_file)"
    return "set (inline admin_token)"


def policy_document(config: ProxyConfig) -> Dict[str, Any]:
    """
    The whole effective policy as JSON-able values: the L{settings}, each
    domain pattern and address range with where it came from (in order), the
    clients (names, modes and overlays, never a token), the allowed unix
    sockets, the secrets (name, source and hosts, never a value), the limits
    (each with whether it is the default) and the config's warnings.
    """
    limits = config.limits
    defaults = type(limits)()
    return {
        "source": config.source,
        "settings": dict(settings(config)),
        "allowed_domains": _patterns(config, config.allowed_domains),
        "denied_domains": _patterns(config, config.denied_domains),
        "allowed_ranges": _patterns(config, config.allowed_ranges),
        "denied_ranges": _patterns(config, config.denied_ranges),
        "require_client_auth": config.require_client_auth,
        "clients": [
            {
                "name": client.name,
                "mode": client.mode.value if client.mode is not None else f"{config.mode.value} (base)",
                "allowed_domains": _patterns(client, client.allowed_domains),
                "denied_domains": _patterns(client, client.denied_domains),
            }
            for client in config.clients
        ],
        "allow_unix_sockets": list(config.allow_unix_sockets),
        "secrets": [
            {"name": secret.name, "source": secret.source, "hosts": list(secret.hosts)}
            for secret in config.secrets
        ],
        "limits": {
            name: {"value": value, "default": value == getattr(defaults, name)}
            for name, value in attrs.asdict(limits).items()
        },
        "warnings": list(config.warnings),
    }


def _patterns(owner: Union[ProxyConfig, Client], patterns: Tuple[str, ...]) -> List[Dict[str, str]]:
    return [
        {"pattern": pattern, "source": owner.pattern_sources[pattern]} for pattern in patterns
    ]


__all__ = ["policy_document", "settings"]
