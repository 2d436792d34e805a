"""
The network section of codex's C{config.toml}, read into a frozen
L{ProxyConfig} (SPEC §2.1, §2.2, §2.3, §2.6), and the managed requirements
of C{--requirements} merged into it (SPEC §2.4).

Pure core: bytes in, value out, no I/O except in L{load_config}. Every
mistake becomes one L{ConfigError} line naming the file, the dotted key and
the bad value, so a user can fix it without reading a traceback.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs

from codex_proxy import domains
from codex_proxy.errors import ProxyError
from codex_proxy.model import Mode

DEFAULTS_SOURCE = "<defaults>"


class ConfigError(ProxyError):
    """
    The configuration is unusable; C{str()} is one line for people.

    @ivar source: the file name (or C{"<defaults>"}, C{"<environment>"}).
    @ivar key: the dotted key at fault, or C{None} for the file as a whole.
    @ivar message: what is wrong with it.
    """

    def __init__(self, source: str, key: Optional[str], message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


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
    authority, tail = re.match(r"^([^/?#]*)(.*)$", rest).groups()
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


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


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
    pattern_sources: Mapping[str, str] = attrs.field(
        factory=dict, converter=MappingProxyType, hash=False
    )
    warnings: tuple[str, ...] = ()
    explicit: frozenset[str] = frozenset()
    section: str = attrs.field(default="network", eq=False)
    managed_allowed_domains_only: bool = False

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
)
_LIMIT_KEYS = tuple(attrs.fields_dict(Limits))


def _quote(name: str) -> str:
    """
    A TOML key as the user would write it: bare when possible.
    """
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    return json.dumps(name, ensure_ascii=False)


def _show(value: Any) -> str:
    """
    A value as TOML would spell it, prefixed by its TOML type.
    """
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    names = {int: "integer", float: "float", str: "string", list: "array"}
    kind = names.get(type(value), "table" if isinstance(value, dict) else "datetime")
    return f"{kind} {value!r}"


@attrs.frozen
class _Table:
    """
    A TOML table being validated, with where it sits for messages.
    """

    values: Mapping[str, Any]
    source: str
    path: str

    def key(self, name: str) -> str:
        return f"{self.path}.{_quote(name)}" if self.path else _quote(name)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, key, message)

    def check_keys(self, known: Iterable[str]) -> None:
        """
        Refuse unknown keys, suggesting the closest known one.
        """
        known = tuple(known)
        for name in self.values:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else "known keys: " + ", ".join(known)
                )
                raise self.error(self.key(name), f"unknown key ({hint})")

    def get(
        self, name: str, default: Any, accept: Callable[[Any], bool], expected: str
    ) -> Any:
        """
        The value of C{name} if C{accept(value)}, C{default} if absent.
        """
        if name not in self.values:
            return default
        value = self.values[name]
        if not accept(value):
            raise self.error(self.key(name), f"expected {expected}, got {_show(value)}")
        return value

    def strings(self, name: str) -> list[tuple[str, str]]:
        """
        A list of strings, each with its dotted key and index.
        """
        values = self.get(name, [], _is_list, "an array of strings")
        key = self.key(name)
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise self.error(
                    f"{key}[{index}]", f"expected a string, got {_show(value)}"
                )
        return [(value, f"{key}[{index}]") for index, value in enumerate(values)]

    def table(self, name: str) -> _Table:
        values = self.get(name, {}, _is_table, "a table")
        return _Table(values, self.source, self.key(name))


def _pattern(text: str, key: str, table: _Table) -> str:
    try:
        return domains.parse_pattern(text).text
    except domains.PatternError as e:
        reason = str(e)
        if repr(text) not in reason:
            reason = f"invalid pattern {text!r}: {reason}"
        raise table.error(key, reason) from None


def _domain_lists(network: _Table) -> tuple[dict[str, str], dict[str, str]]:
    """
    Merge the two lists and the C{domains} map into allowed and denied
    pattern texts, each mapped to where it first appeared.
    """
    allowed: dict[str, str] = {}
    denied: dict[str, str] = {}
    for name, into in (("allowed_domains", allowed), ("denied_domains", denied)):
        for text, key in network.strings(name):
            into.setdefault(_pattern(text, key, network), f"{network.source}: {key}")
    mapping = network.table("domains")
    for text, action in mapping.values.items():
        key = mapping.key(text)
        if not isinstance(action, str):
            raise mapping.error(key, f"expected a string, got {_show(action)}")
        if action not in ("allow", "deny"):
            raise mapping.error(
                key, f"unknown value {action!r} (expected 'allow' or 'deny')"
            )
        into = allowed if action == "allow" else denied
        into.setdefault(_pattern(text, key, mapping), f"{network.source}: {key}")
    return allowed, denied


def _unix_sockets(network: _Table) -> tuple[str, ...]:
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


def _limits(network: _Table) -> Limits:
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
    network: _Table, listens: dict[str, ListenAddress], dangerous: bool, unix: bool
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


def _network_config(network: _Table) -> ProxyConfig:
    network.check_keys(_NETWORK_KEYS)
    flags = {
        name: network.get(name, getattr(_DEFAULT_CONFIG, name), _is_bool, "a boolean")
        for name in _BOOL_KEYS
    }
    mode = network.get("mode", "full", _is_str, "a string")
    if mode not in ("full", "limited"):
        raise network.error(
            network.key("mode"),
            f"unknown value {mode!r} (expected 'full' or 'limited')",
        )
    listens = {}
    for name, field in _LISTEN_KEYS.items():
        text = network.get(name, None, _is_str, "a string")
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
    return ProxyConfig(
        **flags,
        http_listen=listens["proxy_url"],
        socks_listen=listens["socks_url"],
        mode=Mode(mode),
        allowed_domains=tuple(allowed),
        denied_domains=tuple(denied),
        allow_unix_sockets=unix_sockets,
        limits=_limits(network),
        source=network.source,
        pattern_sources={**allowed, **denied},
        warnings=warnings,
        explicit=frozenset(network.values),
        section=network.path,
    )


def _network_section(document: Mapping[str, Any], source: str) -> _Table:
    """
    Find the network table (SPEC §2.1): the selected permissions profile,
    else the legacy C{[network]}, else an empty table.
    """
    top = _Table(document, source, "")
    if "default_permissions" in document:
        name = document["default_permissions"]
        if not isinstance(name, str):
            raise top.error(
                "default_permissions", f"expected a string, got {_show(name)}"
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
                f"(no [permissions.{_quote(name)}] table)",
            )
        profile = _Table(profiles, source, "permissions").get(
            name, {}, _is_table, "a table"
        )
        return _Table(profile, source, f"permissions.{_quote(name)}").table("network")
    return top.table("network")


def parse_config(data: bytes, source: str) -> ProxyConfig:
    """
    Read codex's C{config.toml} contents; only the network section is
    validated, every other key of the file is left to codex.

    @param source: the file name to put in messages.
    @raise ConfigError: on any mistake, naming C{source}.
    """
    return _network_config(_network_section(load_toml(data, source), source))


def read_file(path: str, what: str) -> bytes:
    """
    The bytes of the file at C{path}.

    @param what: what the file is, for the message (C{"config file"}).
    @raise ConfigError: the file cannot be read, naming it.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read {what}: {e.strerror}") from None


def load_toml(data: bytes, source: str) -> dict[str, Any]:
    """
    Decode a TOML document.

    @raise ConfigError: it is not UTF-8 or not TOML, naming C{source}.
    """
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(source, None, f"not valid UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, None, f"invalid TOML: {e}") from None


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


NO_REQUIREMENTS_SOURCE = "<no requirements>"
_REQUIREMENTS_TABLE = "experimental_network"
#: The keys a requirements file may cap, with the value that exceeds a cap.
_CEILING_KEYS = (
    "enabled",
    "allow_upstream_proxy",
    "dangerously_allow_non_loopback_proxy",
    "allow_local_binding",
    "dangerously_allow_all_unix_sockets",
    "mode",
)
_REQUIREMENTS_KEYS = (
    "allowed_domains",
    "denied_domains",
    "managed_allowed_domains_only",
    *_CEILING_KEYS,
)


@attrs.frozen
class Requirements:
    """
    Managed requirements (SPEC §2.4): what an organisation imposes on every
    user config.

    @ivar allowed_domains: canonical patterns every user gets allowed, without
        the ones the requirements also deny.
    @ivar denied_domains: canonical patterns no user can lift.
    @ivar managed_allowed_domains_only: the allowlist is exactly
        C{allowed_domains}; user additions are ignored, misses hard-denied.
    @ivar ceilings: config key -> the most a user may set it to (C{False},
        or L{Mode.LIMITED}); keys absent are not capped.
    @ivar source: the requirements file name, or C{"<no requirements>"}.
    @ivar pattern_sources: pattern -> C{"file: dotted.key[index]"}.
    """

    allowed_domains: tuple[str, ...] = ()
    denied_domains: tuple[str, ...] = ()
    managed_allowed_domains_only: bool = False
    ceilings: Mapping[str, Any] = attrs.field(
        factory=dict, converter=MappingProxyType, hash=False
    )
    source: str = NO_REQUIREMENTS_SOURCE
    pattern_sources: Mapping[str, str] = attrs.field(
        factory=dict, converter=MappingProxyType, hash=False
    )


def parse_requirements(data: bytes, source: str) -> Requirements:
    """
    Read a requirements file: its C{[experimental_network]} table is
    validated as strictly as the network section; other tables belong to
    codex. A file without the table imposes nothing.

    @raise ConfigError: on any mistake, naming C{source}, the dotted key and
        the value.
    """
    document = load_toml(data, source)
    table = _Table(document, source, "").table(_REQUIREMENTS_TABLE)
    table.check_keys(_REQUIREMENTS_KEYS)
    allowed, denied = _pattern_lists(table)
    ceilings: dict[str, Any] = {}
    for name in _CEILING_KEYS:
        if name == "mode":
            mode = table.get(name, None, _is_str, "a string")
            if mode is None:
                continue
            if mode not in ("full", "limited"):
                raise table.error(
                    table.key(name),
                    f"unknown value {mode!r} (expected 'full' or 'limited')",
                )
            ceilings[name] = Mode(mode)
        elif name in table.values:
            ceilings[name] = table.get(name, None, _is_bool, "a boolean")
    return Requirements(
        allowed_domains=tuple(allowed),
        denied_domains=tuple(denied),
        managed_allowed_domains_only=table.get(
            "managed_allowed_domains_only", False, _is_bool, "a boolean"
        ),
        ceilings=ceilings,
        source=source,
        pattern_sources={**allowed, **denied},
    )


def _pattern_lists(table: _Table) -> tuple[dict[str, str], dict[str, str]]:
    """
    The C{allowed_domains} and C{denied_domains} arrays of C{table} as
    canonical pattern -> where it first appeared; a pattern in both lists is
    kept only as denied.
    """
    allowed: dict[str, str] = {}
    denied: dict[str, str] = {}
    for name, into in (("allowed_domains", allowed), ("denied_domains", denied)):
        for text, key in table.strings(name):
            into.setdefault(_pattern(text, key, table), f"{table.source}: {key}")
    allowed = {text: where for text, where in allowed.items() if text not in denied}
    return allowed, denied


def parse_domain_lists(data: bytes, source: str) -> tuple[dict[str, str], dict[str, str]]:
    """
    A file of nothing but top-level C{allowed_domains} and C{denied_domains}
    arrays (the remembered approvals of SPEC §2.5), validated like the
    network section: see L{_pattern_lists}.

    @raise ConfigError: naming C{source}, the key and the value.
    """
    table = _Table(load_toml(data, source), source, "")
    table.check_keys(("allowed_domains", "denied_domains"))
    return _pattern_lists(table)


def load_requirements(path: str) -> Requirements:
    """
    Read and parse the requirements file at C{path}.

    @raise ConfigError: the file cannot be read or is invalid.
    """
    return parse_requirements(read_file(path, "requirements file"), path)


def _exceeds(value: Any, ceiling: Any) -> bool:
    if isinstance(ceiling, Mode):
        return ceiling is Mode.LIMITED and value is Mode.FULL
    return bool(value) and not ceiling


def _spell(value: Any) -> str:
    """
    A ceiling-checked value as TOML spells it.
    """
    if isinstance(value, Mode):
        return json.dumps(value.value)
    return str(value).lower()


def merge_requirements(config: ProxyConfig, requirements: Requirements) -> ProxyConfig:
    """
    The effective config of a user config under managed requirements
    (SPEC §2.4): domain lists merged (deny from every source wins), the
    allowlist pinned to the managed one when C{managed_allowed_domains_only},
    and every ceiling applied.

    @raise ConfigError: the user config sets a key above its ceiling
        explicitly; the message names both files and keys.
    """
    changes: dict[str, Any] = {}
    for name, ceiling in requirements.ceilings.items():
        value = getattr(config, name)
        if not _exceeds(value, ceiling):
            continue
        if name in config.explicit:
            raise ConfigError(
                config.source,
                f"{config.section}.{name}",
                f"{_spell(value)} exceeds the managed ceiling "
                f"{requirements.source}: {_REQUIREMENTS_TABLE}.{name} = {_spell(ceiling)}",
            )
        changes[name] = ceiling
    denied = dict.fromkeys((*requirements.denied_domains, *config.denied_domains))
    warnings = config.warnings
    if requirements.managed_allowed_domains_only:
        ignored = [
            text
            for text in config.allowed_domains
            if text not in requirements.allowed_domains
        ]
        if ignored:
            warnings += (
                f"{requirements.source}: {_REQUIREMENTS_TABLE}."
                "managed_allowed_domains_only = true: ignoring allowed patterns "
                "not in the managed allowlist: "
                + ", ".join(f"{text} ({config.pattern_sources[text]})" for text in ignored),
            )
        allowed = dict.fromkeys(requirements.allowed_domains)
    else:
        allowed = dict.fromkeys((*requirements.allowed_domains, *config.allowed_domains))
    allowed_domains = tuple(text for text in allowed if text not in denied)
    managed = requirements.pattern_sources
    sources = {
        text: managed[text] if text in requirements.allowed_domains else config.pattern_sources[text]
        for text in allowed_domains
    }
    for text in denied:
        sources[text] = (
            managed[text] if text in requirements.denied_domains else config.pattern_sources[text]
        )
    return attrs.evolve(
        config,
        **changes,
        allowed_domains=allowed_domains,
        denied_domains=tuple(denied),
        pattern_sources=sources,
        warnings=warnings,
        managed_allowed_domains_only=requirements.managed_allowed_domains_only,
    )
