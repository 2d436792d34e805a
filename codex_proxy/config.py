"""
The network section of codex's C{config.toml}, read into a frozen
L{ProxyConfig} (SPEC §2.1, §2.2, §2.3, §2.6).

Pure core: bytes in, value out, no I/O except in L{load_config}. Every
mistake becomes one L{ConfigError} line naming the file, the dotted key and
the bad value (the checks shared with the other policy files are in
L{codex_proxy._toml}); managed requirements and remembered rules are
L{codex_proxy.sources}'.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import attrs

from codex_proxy import _httpbody
from codex_proxy.addresses import parse_range
from codex_proxy._placeholders import SecretConfig, parse_secrets
from codex_proxy._toml import (
    ConfigError as ConfigError,
    Table,
    is_str,
    is_table,
    load_toml,
    quote,
    read_file,
    readonly,
    show,
)
from codex_proxy._listen import ListenAddress as ListenAddress
from codex_proxy._listen import clamp_listens, loopback_listen
from codex_proxy._listen import parse_listen_address as parse_listen_address
from codex_proxy.clients import CLIENT_KEYS, Client, parse_clients
from codex_proxy.model import Mode

DEFAULTS_SOURCE = "<defaults>"


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@attrs.frozen
class Limits:
    """
    Resource limits and timeouts (SPEC §2.6); C{_s} values are seconds.
    """

    max_request_line_bytes: int = 8192
    max_header_bytes: int = 65536
    max_header_fields: int = 100
    header_timeout_s: float = 30
    keepalive_idle_s: float = 120
    connect_timeout_s: float = 10
    socks_handshake_timeout_s: float = 10
    tunnel_idle_s: float = 3600
    response_timeout_s: float = 300
    max_connections: int = 4096
    max_udp_associations: int = 256
    decider_timeout_s: float = 30
    max_connections_per_client: int = 1024


@attrs.frozen
class ProxyConfig:
    """
    The validated network section, listeners already clamped (SPEC §2.3).

    @ivar allowed_domains: canonical pattern texts, first occurrence order,
        without any pattern that is also denied.
    @ivar denied_domains: canonical pattern texts, first occurrence order.
    @ivar source: the file name used in messages, or C{"<defaults>"}.
    @ivar pattern_sources: pattern text -> C{"file: dotted.key[index]"} of
        the entry that put it in its list, for C{explain}.
    @ivar warnings: what clamping changed or let through, one line each.
    @ivar explicit: the keys of SPEC §2.2 the file sets, so managed
        requirements can tell a user's choice from a default.
    @ivar section: the dotted path of the network table in C{source}, for
        messages about its keys (where the table sits does not change what
        the config means, so it takes no part in equality).
    @ivar managed_allowed_domains_only: the allowlist is the managed one
        only, and its misses are hard-denied: no decider is consulted
        (SPEC §2.4, §9.2).
    @ivar allowed_ranges: canonical CIDRs whose addresses are not refused
        as non-public (SPEC §5.3); where each came from is in
        C{pattern_sources}.
    @ivar denied_ranges: canonical CIDRs no dialled address may be in.
    @ivar dns_listen: the DNS listener's address (SPEC §14.2), or C{None}.
    @ivar secrets: the credentials injected on egress (SPEC §12), without
        their values.
    @ivar clients: the named clients and their overlays (SPEC §11).
    @ivar require_client_auth: anonymous connections are refused.
    """

    enabled: bool = False
    http_listen: ListenAddress = ListenAddress("127.0.0.1", 3128)
    enable_socks5: bool = True
    socks_listen: ListenAddress = ListenAddress("127.0.0.1", 8081)
    enable_socks5_udp: bool = True
    allow_upstream_proxy: bool = True
    dangerously_allow_non_loopback_proxy: bool = False
    mode: Mode = Mode.FULL
    mitm: bool = False
    allowed_domains: tuple[str, ...] = ()
    denied_domains: tuple[str, ...] = ()
    allow_local_binding: bool = False
    allow_unix_sockets: tuple[str, ...] = ()
    dangerously_allow_all_unix_sockets: bool = False
    limits: Limits = Limits()
    source: str = DEFAULTS_SOURCE
    pattern_sources: Mapping[str, str] = attrs.field(factory=dict, converter=readonly, hash=False)
    warnings: tuple[str, ...] = ()
    explicit: frozenset[str] = frozenset()
    section: str = attrs.field(default="network", eq=False)
    managed_allowed_domains_only: bool = False
    allowed_ranges: tuple[str, ...] = ()
    denied_ranges: tuple[str, ...] = ()
    dns_listen: Optional[ListenAddress] = None
    secrets: tuple[SecretConfig, ...] = ()
    dangerously_allow_plaintext_secrets: bool = False
    clients: tuple[Client, ...] = ()
    require_client_auth: bool = False
    admin_listen: Optional[ListenAddress] = None
    admin_token: Optional[str] = attrs.field(default=None, repr=False)

    @classmethod
    def default(cls) -> ProxyConfig:
        """
        The configuration used when no file says anything: proxy disabled.
        """
        return cls()


_DEFAULT_CONFIG = ProxyConfig.default()
_DEFAULT_LIMITS = Limits()
_BOOL_KEYS = (
    "enabled",
    "enable_socks5",
    "enable_socks5_udp",
    "allow_upstream_proxy",
    "dangerously_allow_non_loopback_proxy",
    "mitm",
    "allow_local_binding",
    "dangerously_allow_all_unix_sockets",
    "dangerously_allow_plaintext_secrets",
)
_LISTEN_KEYS = {"proxy_url": "http_listen", "socks_url": "socks_listen"}
_NETWORK_KEYS = (
    *_BOOL_KEYS,
    *_LISTEN_KEYS,
    "mode",
    "allowed_domains",
    "denied_domains",
    "domains",
    "allow_unix_sockets",
    "limits",
    "allowed_ranges",
    "denied_ranges",
    "dns_url",
    "secrets",
    *CLIENT_KEYS,
    "admin_url",
    "admin_token",
    "admin_token_file",
)
_LIMIT_KEYS = tuple(attrs.fields_dict(Limits))


def _domain_lists(network: Table) -> tuple[dict[str, str], dict[str, str]]:
    """
    Merge the two lists and the C{domains} map into allowed and denied
    pattern texts, each mapped to where it first appeared.
    """
    allowed: dict[str, str] = {}
    denied: dict[str, str] = {}
    network.patterns("allowed_domains", allowed)
    network.patterns("denied_domains", denied, deny=True)
    mapping = network.table("domains")
    for text, action in mapping.values.items():
        key = mapping.key(text)
        if not isinstance(action, str):
            raise mapping.error(key, f"expected a string, got {show(action)}")
        if action not in ("allow", "deny"):
            raise mapping.error(
                key, f"unknown value {action!r} (expected 'allow' or 'deny')"
            )
        into = allowed if action == "allow" else denied
        pattern = mapping.pattern(text, key, deny=action == "deny")
        into.setdefault(pattern, f"{network.source}: {key}")
    return allowed, denied


def address_ranges(table: Table, name: str) -> dict[str, str]:
    """
    The array of CIDRs C{name} of C{table} (SPEC §5.3), canonical text ->
    where it first appeared (C{"file: dotted.key[index]"}).

    @raise ConfigError: an entry is not a CIDR or an address, has host bits
        set or a bad prefix; the message names the entry.
    """
    found: dict[str, str] = {}
    for text, key in table.strings(name):
        try:
            canonical = str(parse_range(text))
        except ValueError as e:
            raise table.error(key, str(e)) from None
        found.setdefault(canonical, f"{table.source}: {key}")
    return found


def _unix_sockets(network: Table) -> tuple[str, ...]:
    """
    The allowed socket paths, without duplicates; they may not exist yet,
    but must be absolute so their meaning does not depend on a directory.
    """
    paths: dict[str, None] = {}
    for path, key in network.strings("allow_unix_sockets"):
        if not path.startswith("/"):
            raise network.error(
                key, f"unix socket path {path!r} must be an absolute path"
            )
        paths.setdefault(path)
    return tuple(paths)


def _limits(network: Table) -> Limits:
    table = network.table("limits")
    table.check_keys(_LIMIT_KEYS)
    values = {}
    for name in _LIMIT_KEYS:
        if name.endswith("_s"):
            accept, expected = _positive_number, "a number of seconds > 0"
        else:
            accept, expected = _positive_int, "an integer > 0"
        values[name] = table.get(name, getattr(_DEFAULT_LIMITS, name), accept, expected)
    return Limits(**values)


def _network_config(network: Table) -> ProxyConfig:
    network.check_keys(_NETWORK_KEYS)
    flags = {name: network.boolean(name, getattr(_DEFAULT_CONFIG, name)) for name in _BOOL_KEYS}
    mode = network.mode("mode") or Mode.FULL
    listens = {}
    for name, field in _LISTEN_KEYS.items():
        text = network.get(name, None, is_str, "a string")
        if text is None:
            listens[name] = getattr(_DEFAULT_CONFIG, field)
            continue
        try:
            listens[name] = parse_listen_address(text)
        except ValueError as e:
            raise network.error(
                network.key(name), f"invalid listener address {text!r}: {e}"
            ) from None
    allowed, denied = _domain_lists(network)
    unix_sockets = _unix_sockets(network)
    listens, warnings = clamp_listens(
        network,
        listens,
        flags["dangerously_allow_non_loopback_proxy"],
        bool(unix_sockets) or flags["dangerously_allow_all_unix_sockets"],
    )
    allowed = {text: where for text, where in allowed.items() if text not in denied}
    allowed_ranges = address_ranges(network, "allowed_ranges")
    denied_ranges = address_ranges(network, "denied_ranges")
    clients, require_client_auth = parse_clients(network, mode)
    admin_listen = loopback_listen(network, "admin_url", "operations listener", "http")
    admin_token = network.token("admin_token", "admin_token_file")
    if clients and admin_listen is not None and admin_token is None:
        # Who may use the proxy is controlled: so is who may look at it.
        raise network.error(
            network.key("admin_token"), "required when clients are configured (SPEC §13)"
        )
    return ProxyConfig(
        **flags,
        http_listen=listens["proxy_url"],
        socks_listen=listens["socks_url"],
        mode=mode,
        allowed_domains=tuple(allowed),
        denied_domains=tuple(denied),
        allow_unix_sockets=unix_sockets,
        limits=_limits(network),
        source=network.source,
        pattern_sources={**allowed, **denied, **allowed_ranges, **denied_ranges},
        warnings=warnings,
        explicit=frozenset(network.values),
        section=network.path,
        allowed_ranges=tuple(allowed_ranges),
        denied_ranges=tuple(denied_ranges),
        dns_listen=loopback_listen(network, "dns_url", "DNS listener"),
        admin_listen=admin_listen,
        admin_token=admin_token,
        secrets=parse_secrets(network),
        clients=clients,
        require_client_auth=require_client_auth,
    )


def _network_section(document: Mapping[str, Any], source: str) -> Table:
    """
    Find the network table (SPEC §2.1): the selected permissions profile,
    else the legacy C{[network]}, else an empty table.
    """
    top = Table(document, source, "")
    if "default_permissions" in document:
        name = document["default_permissions"]
        if not isinstance(name, str):
            raise top.error(
                "default_permissions", f"expected a string, got {show(name)}"
            )
        profiles = document.get("permissions")
        if not isinstance(profiles, dict):
            raise top.error(
                "default_permissions",
                f"profile {name!r} is not defined: the file has no [permissions] table",
            )
        if name not in profiles:
            raise top.error(
                "default_permissions",
                f"profile {name!r} is not defined "
                f"(no [permissions.{quote(name)}] table)",
            )
        profile = Table(profiles, source, "permissions").get(
            name, {}, is_table, "a table"
        )
        return Table(profile, source, f"permissions.{quote(name)}").table("network")
    return top.table("network")


def parse_config(data: bytes, source: str) -> ProxyConfig:
    """
    Read codex's C{config.toml} contents; only the network section is
    validated, every other key of the file is left to codex.

    @param source: the file name to put in messages.
    @raise ConfigError: on any mistake, naming C{source}.
    """
    return _network_config(_network_section(load_toml(data, source), source))


def load_config(path: str) -> ProxyConfig:
    """
    Read and parse the file at C{path}.

    @raise ConfigError: the file cannot be read or is invalid.
    """
    return parse_config(read_file(path, "config file"), path)


def codex_home(environ: Mapping[str, str]) -> str:
    """
    C{$CODEX_HOME}, defaulting to C{~/.codex} with C{~} taken from
    C{environ}'s C{HOME}.
    """
    home = environ.get("HOME")
    path = environ.get("CODEX_HOME") or "~/.codex"
    if path == "~" or path.startswith("~/"):
        if not home:
            raise ConfigError(
                "<environment>", "HOME", "not set (set CODEX_HOME or pass --config)"
            )
        path = home + path[1:]
    return path


def default_config_path(environ: Mapping[str, str]) -> str:
    """
    C{$CODEX_HOME/config.toml} (see L{codex_home}).
    """
    return os.path.join(codex_home(environ), "config.toml")


def head_limits(config: ProxyConfig) -> _httpbody.HeadLimits:
    """
    The head parser limits of C{config} (SPEC §2.6), built once per listener.
    """
    limits = config.limits
    return _httpbody.HeadLimits(
        max_request_line_bytes=limits.max_request_line_bytes,
        max_header_bytes=limits.max_header_bytes,
        max_header_fields=limits.max_header_fields,
    )
