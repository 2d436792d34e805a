"""
Where the effective policy comes from (SPEC §2.4, §2.5): the user config,
the managed requirements, the remembered approvals of
C{$CODEX_HOME/proxy/network-rules.toml}, and additions made at run time.

Pure core apart from the small file helpers (L{load_sources},
L{load_rules}, L{write_rules}), which callers run off the reactor thread.

User-side entries are layered in order: config file, then remembered rules,
then runtime additions. A later layer's entry removes the same pattern from
the opposite list of the earlier user layers (so a remembered "always allow"
means the same after a restart as when it was given); managed entries are
never removed, and a deny from any source still wins at match time.
"""

from __future__ import annotations

import enum
import os
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

import attrs

from codex_proxy import config as _config
from codex_proxy.config import (
    ConfigError,
    ProxyConfig,
    Requirements,
    load_config,
    load_requirements,
    merge_requirements,
)
from codex_proxy.domains import DomainSet, PatternError, PatternKind, parse_pattern
from codex_proxy.errors import ProxyError

RULES_FILE = os.path.join("proxy", "network-rules.toml")
RUNTIME_SOURCE = "<runtime>"
NO_RULES_SOURCE = "<no remembered rules>"
#: Keys fixed for the life of a process (SPEC §2.5), as ProxyConfig fields.
LISTENER_FIELDS = (
    "enabled",
    "http_listen",
    "socks_listen",
    "enable_socks5",
    "enable_socks5_udp",
)
#: Fields whose change a reload reports, besides the domain lists.
_REPORTED_FIELDS = (
    "mode",
    "mitm",
    "allow_local_binding",
    "allow_upstream_proxy",
    "managed_allowed_domains_only",
    "allow_unix_sockets",
    "dangerously_allow_all_unix_sockets",
)


class RuleError(ProxyError):
    """
    A runtime addition was invalid or refused; C{str()} says why.
    """


class Action(str, enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


def rules_path(environ: Mapping[str, str]) -> str:
    """
    C{$CODEX_HOME/proxy/network-rules.toml}.
    """
    return os.path.join(_config.codex_home(environ), RULES_FILE)


@attrs.frozen
class RememberedRules:
    """
    The remembered approvals file: canonical patterns, each list in file
    order, a pattern in both lists kept only as denied (fail closed).
    """

    allowed_domains: tuple[str, ...] = ()
    denied_domains: tuple[str, ...] = ()
    source: str = NO_RULES_SOURCE
    pattern_sources: Mapping[str, str] = attrs.field(
        factory=dict, converter=MappingProxyType, hash=False
    )

    def with_rule(self, pattern: str, action: Action) -> RememberedRules:
        """
        These rules with canonical C{pattern} appended to the list of
        C{action} and removed from the other one.
        """
        allowed = [text for text in self.allowed_domains if text != pattern]
        denied = [text for text in self.denied_domains if text != pattern]
        (allowed if action is Action.ALLOW else denied).append(pattern)
        return parse_rules(render_rules(allowed, denied), self.source)


def parse_rules(data: bytes, source: str) -> RememberedRules:
    """
    Read a remembered-rules file: top-level C{allowed_domains} and
    C{denied_domains} arrays of patterns, nothing else.

    @raise ConfigError: naming C{source}, the dotted key and the value.
    """
    allowed, denied = _config.parse_domain_lists(data, source)
    return RememberedRules(tuple(allowed), tuple(denied), source, {**allowed, **denied})


def load_rules(path: str) -> RememberedRules:
    """
    The remembered rules at C{path}; a missing file is an empty one.

    @raise ConfigError: the file exists but cannot be read or is invalid.
    """
    if not os.path.lexists(path):
        return RememberedRules(source=path)
    return parse_rules(_config.read_file(path, "remembered rules file"), path)


def _toml_strings(values: Iterable[str]) -> str:
    # Canonical patterns are ASCII hostname/IP syntax: nothing to escape.
    return "[" + ", ".join(f'"{text}"' for text in values) + "]"


def render_rules(allowed: Iterable[str], denied: Iterable[str]) -> bytes:
    """
    The file text for these canonical patterns.
    """
    return (
        "# Remembered network approvals of codex-proxy: loaded at start and on\n"
        "# every reload (SIGHUP), merged with the config's lists. Editable.\n"
        f"allowed_domains = {_toml_strings(allowed)}\n"
        f"denied_domains = {_toml_strings(denied)}\n"
    ).encode("ascii")


def write_rules(rules: RememberedRules) -> None:
    """
    Replace the file at C{rules.source} atomically (temporary file, fsync,
    rename), creating its directory private to the user if needed.
    """
    path = rules.source
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(render_rules(rules.allowed_domains, rules.denied_domains))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def persist_rule(path: str, pattern: str, action: Action) -> RememberedRules:
    """
    Add one canonical rule to the file at C{path} (blocking: run it off the
    reactor thread). The file is re-read first, so hand edits survive.

    @raise ConfigError: the existing file is invalid; it is left untouched.
    """
    rules = load_rules(path).with_rule(pattern, action)
    write_rules(rules)
    return rules


@attrs.frozen
class RuntimeRules:
    """
    Additions made at run time: pattern -> action, oldest first; adding a
    pattern again moves it to the end with its new action.
    """

    entries: Mapping[str, Action] = attrs.field(
        factory=dict, converter=MappingProxyType, hash=False
    )

    def add(self, pattern: str, action: Action) -> RuntimeRules:
        entries = {k: v for k, v in self.entries.items() if k != pattern}
        entries[pattern] = action
        return RuntimeRules(entries)


@attrs.frozen
class SourcePaths:
    """
    The files a policy is read from; C{None} for an absent source.
    """

    config: Optional[str] = None
    requirements: Optional[str] = None
    rules: Optional[str] = None


@attrs.frozen
class Sources:
    """
    The parsed files of a L{SourcePaths}.
    """

    config: ProxyConfig
    requirements: Requirements = Requirements()
    remembered: RememberedRules = RememberedRules()


def load_sources(paths: SourcePaths) -> Sources:
    """
    Read and validate every file of C{paths} (blocking), and check that
    they agree (L{effective_config}).

    @raise ConfigError: naming the file, the dotted key and the value.
    """
    if paths.config is None:
        raise ConfigError("<no config file>", None, "the proxy was given a config object, not a file")
    sources = Sources(
        load_config(paths.config),
        Requirements() if paths.requirements is None else load_requirements(paths.requirements),
        RememberedRules() if paths.rules is None else load_rules(paths.rules),
    )
    effective_config(sources)
    return sources


def _overlay(
    allowed: dict[str, str],
    denied: dict[str, str],
    entries: Iterable[tuple[str, Action, str]],
) -> None:
    for pattern, action, where in entries:
        if action is Action.ALLOW:
            denied.pop(pattern, None)
            allowed.setdefault(pattern, where)
        else:
            allowed.pop(pattern, None)
            denied.setdefault(pattern, where)


def effective_config(sources: Sources, runtime: RuntimeRules = RuntimeRules()) -> ProxyConfig:
    """
    The config decisions use: the user layers (config, remembered rules,
    runtime additions) merged under the managed requirements.

    @raise ConfigError: the user config exceeds a managed ceiling.
    """
    config = sources.config
    where = config.pattern_sources
    allowed = {text: where[text] for text in config.allowed_domains}
    denied = {text: where[text] for text in config.denied_domains}
    remembered = sources.remembered
    _overlay(
        allowed,
        denied,
        [
            (text, Action.ALLOW, remembered.pattern_sources[text])
            for text in remembered.allowed_domains
        ]
        + [
            (text, Action.DENY, remembered.pattern_sources[text])
            for text in remembered.denied_domains
        ],
    )
    _overlay(
        allowed,
        denied,
        [(text, action, RUNTIME_SOURCE) for text, action in runtime.entries.items()],
    )
    user = attrs.evolve(
        config,
        allowed_domains=tuple(allowed),
        denied_domains=tuple(denied),
        pattern_sources={**allowed, **denied},
    )
    return merge_requirements(user, sources.requirements)


def check_addition(requirements: Requirements, pattern: str, action: Action) -> str:
    """
    Validate a runtime addition like a config entry and check that the
    managed requirements permit it (SPEC §2.5): no allow while the allowlist
    is managed, no allow that a managed deny would override entirely.

    @return: the canonical pattern.
    @raise RuleError: saying what is wrong and which requirement forbids it.
    """
    try:
        parsed = parse_pattern(pattern)
    except PatternError as e:
        raise RuleError(f"cannot {action.value} {pattern!r}: {e}") from None
    if action is Action.DENY:
        return parsed.text
    if requirements.managed_allowed_domains_only:
        raise RuleError(
            f"cannot allow {parsed.text!r}: the allowlist is managed "
            f"({requirements.source}: experimental_network."
            "managed_allowed_domains_only = true)"
        )
    managed = DomainSet(parse_pattern(text) for text in requirements.denied_domains)
    covering = _covering_deny(managed, parsed.kind, parsed.domain)
    if covering is not None:
        raise RuleError(
            f"cannot allow {parsed.text!r}: managed requirements deny it "
            f"({requirements.pattern_sources[covering]}: {covering!r})"
        )
    return parsed.text


def _covering_deny(managed: DomainSet, kind: PatternKind, domain: str) -> Optional[str]:
    """
    The managed deny pattern that matches every host the pattern C{kind} +
    C{domain} would allow, if any. A partial overlap is no reason to refuse:
    the deny keeps winning where it applies.
    """
    # "*" is no hostname label, so this probe matches only subdomain wildcards.
    below = managed.match(f"*.{domain}")
    apex = managed.match(domain)
    if kind is PatternKind.EXACT:
        found = apex
    elif kind is PatternKind.SUBDOMAINS:
        found = below
    else:
        found = below if apex is not None else None
    return None if found is None else found.text


def keep_listeners(running: ProxyConfig, new: ProxyConfig) -> tuple[ProxyConfig, tuple[str, ...]]:
    """
    C{new} with the listener keys and limits of the C{running} config, which
    cannot change without a restart, and one warning per key that tried.
    """
    kept: dict[str, Any] = {}
    warnings = []
    for name in (*LISTENER_FIELDS, "limits"):
        old, wanted = getattr(running, name), getattr(new, name)
        if old != wanted:
            kept[name] = old
            warnings.append(
                f"{new.source}: {new.section}.{_field_key(name)}: changed to "
                f"{_show(wanted)}, but it cannot change on a running proxy; "
                f"keeping {_show(old)} until restart"
            )
    return attrs.evolve(new, **kept), tuple(warnings)


def _field_key(name: str) -> str:
    return {"http_listen": "proxy_url", "socks_listen": "socks_url"}.get(name, name)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return repr(value.value)
    return str(value)


def describe_changes(old: ProxyConfig, new: ProxyConfig) -> tuple[str, ...]:
    """
    What differs between two effective configs, one phrase per list or
    key: C{"allowed_domains +a.test -b.test"}, C{"mode 'full' -> 'limited'"}.
    """
    changes = []
    for name in ("allowed_domains", "denied_domains"):
        before, after = getattr(old, name), getattr(new, name)
        added = [f"+{text}" for text in after if text not in before]
        removed = [f"-{text}" for text in before if text not in after]
        if added or removed:
            changes.append(" ".join([name, *added, *removed]))
    for name in _REPORTED_FIELDS:
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            changes.append(f"{name} {_show(before)} -> {_show(after)}")
    return tuple(changes)

