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

import ipaddress
import math
import os
import re
from typing import Any, Mapping, Optional

import attrs

from codex_proxy import _httpbody
from codex_proxy.addresses import parse_range
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
from codex_proxy.model import Mode

DEFAULTS_SOURCE = "<defaults>"


@attrs.frozen
class ListenAddress:
    """
    Where a listener binds: an IP literal (IPv6 without brackets) and a port,
    0 meaning ephemeral.
    """

    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        """
        Only 127.0.0.0/8 and ::1 count: anything else is reachable from
        elsewhere (SPEC §2.3).
        """
        address = ipaddress.ip_address(self.host)
        if address.version == 4:
            return address in _LOOPBACK_V4
        return address == _LOOPBACK_V6

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.ip_address("::1")
_LISTEN_SCHEMES = frozenset({"http", "https", "socks5", "socks5h"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def parse_listen_address(text: str) -> ListenAddress:
    """
    Parse C{[scheme://]host:port[/]} where host is an IP literal (IPv6 in
    brackets) or C{localhost}; names are refused so a listener never depends
    on DNS.

    @raise ValueError: with a message saying what is wrong.
    """
    rest = text.strip()
    scheme = _SCHEME.match(rest)
    if scheme:
        if scheme.group(1).lower() not in _LISTEN_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme.group(1)!r} "
                "(expected http, https, socks5 or socks5h)"
            )
        rest = rest[scheme.end() :]
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    tail = rest[len(authority) :]
    if tail not in ("", "/"):
        raise ValueError(f"unexpected {tail!r} after host:port")
    if "@" in authority:
        raise ValueError("credentials are not allowed in a listener address")
    if authority.startswith("["):
        host, bracket, port = authority[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise ValueError("expected [IPv6]:port")
        port = port[1:]
        version = 6
    else:
        host, colon, port = authority.rpartition(":")
        if not colon:
            raise ValueError("a port is required (host:port)")
        if ":" in host:
            raise ValueError("an IPv6 address must be in brackets: [::1]:port")
        version = 4
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"invalid port {port!r} (expected 0..65535)")
    if version == 4 and host.lower() == "localhost":
        return ListenAddress("127.0.0.1", int(port))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"host {host!r} must be an IP address or 'localhost'"
        ) from None
    if address.version != version:
        raise ValueError("an IPv6 address must be in brackets: [::1]:port")
    return ListenAddress(str(address), int(port))


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


def _clamp(
    network: Table, listens: dict[str, ListenAddress], dangerous: bool, unix: bool
) -> tuple[dict[str, ListenAddress], tuple[str, ...]]:
    """
    Force non-loopback listeners back to 127.0.0.1 unless the user took the
    risk explicitly and no unix socket is exposed (SPEC §2.3).
    """
    clamped = dict(listens)
    warnings = []
    for name, address in listens.items():
        if address.is_loopback:
            continue
        where = f"{network.source}: {network.key(name)}"
        safe = ListenAddress("127.0.0.1", address.port)
        if unix:
            clamped[name] = safe
            warnings.append(
                f"{where}: non-loopback address {address} replaced by {safe} "
                "because unix sockets are allowed (allow_unix_sockets or "
                "dangerously_allow_all_unix_sockets)"
            )
        elif dangerous:
            warnings.append(
                f"{where}: DANGEROUS: listening on non-loopback address {address} "
                "(dangerously_allow_non_loopback_proxy = true); other machines "
                "can use this proxy"
            )
        else:
            clamped[name] = safe
            warnings.append(
                f"{where}: non-loopback address {address} replaced by {safe} "
                "(set dangerously_allow_non_loopback_proxy = true to keep it)"
            )
    return clamped, tuple(warnings)


def _loopback_listen(
    network: Table, name: str, what: str, scheme: Optional[str] = None
) -> Optional[ListenAddress]:
    """
    The address of a listener that binds loopback only, whatever
    C{dangerously_allow_non_loopback_proxy} says, or C{None} when C{name}
    is unset: the DNS listener (SPEC §14.2; an open resolver answering for
    the allowlist is never wanted) and the operations listener (SPEC §13;
    it shows the policy and every recent block). With C{scheme}, a URL
    must use that one; without, any scheme is ignored.
    """
    text = network.get(name, None, is_str, "a string")
    if text is None:
        return None
    key = network.key(name)
    found = _SCHEME.match(text.strip())
    if found and scheme is not None and found.group(1).lower() != scheme:
        raise network.error(key, f"invalid listener address {text!r}: the scheme must be {scheme}")
    try:
        address = parse_listen_address(text.strip()[found.end() :] if found else text)
    except ValueError as e:
        raise network.error(key, f"invalid listener address {text!r}: {e}") from None
    if not address.is_loopback:
        raise network.error(
            key,
            f"{address} is not on loopback (the {what} is loopback only, whatever"
            " dangerously_allow_non_loopback_proxy says)",
        )
    return address


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
    listens, warnings = _clamp(
        network,
        listens,
        flags["dangerously_allow_non_loopback_proxy"],
        bool(unix_sockets) or flags["dangerously_allow_all_unix_sockets"],
    )
    allowed = {text: where for text, where in allowed.items() if text not in denied}
    allowed_ranges = address_ranges(network, "allowed_ranges")
    denied_ranges = address_ranges(network, "denied_ranges")
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
        dns_listen=_loopback_listen(network, "dns_url", "DNS listener"),
        admin_listen=_loopback_listen(network, "admin_url", "operations listener", "http"),
        admin_token=network.token("admin_token", "admin_token_file"),
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
