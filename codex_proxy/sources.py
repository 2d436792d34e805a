"""
Where the effective policy comes from (SPEC §2.4, §2.5), and how the layers
combine: the user config, the managed requirements of C{--requirements}
and their ceilings, the remembered approvals of
C{$CODEX_HOME/proxy/network-rules.toml}, and additions made at run time.

Pure core apart from the small file helpers (L{load_sources},
L{load_requirements}, L{load_rules}, L{write_rules}, L{persist_rule}),
which a running proxy calls off the reactor thread.

User-side entries are layered in order: config file, then remembered rules,
then runtime additions. A later layer's entry removes the same pattern from
the opposite list of the earlier user layers (so a remembered "always allow"
means the same after a restart as when it was given); managed entries are
never removed, and a deny from any source still wins at match time.
"""

from __future__ import annotations

import enum
import json
import os
from typing import Any, Container, Iterable, Mapping, Optional

import attrs

from codex_proxy._toml import ConfigError, Table, load_toml, pattern_lists, read_file, readonly
from codex_proxy.config import ProxyConfig, address_ranges, codex_home, load_config
from codex_proxy.domains import ANY_PORT, DomainSet, Pattern, PatternError, PatternKind
from codex_proxy.domains import parse_pattern
from codex_proxy.errors import ProxyError
from codex_proxy.model import Mode

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
    "allowed_ranges",
    "denied_ranges",
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
    @ivar pattern_sources: pattern or range -> C{"file: dotted.key[index]"}.
    @ivar allowed_ranges: canonical CIDRs added to every user's
        C{allowed_ranges} (SPEC §5.3).
    @ivar denied_ranges: canonical CIDRs no user can lift.
    """

    allowed_domains: tuple[str, ...] = ()
    denied_domains: tuple[str, ...] = ()
    managed_allowed_domains_only: bool = False
    ceilings: Mapping[str, Any] = attrs.field(factory=dict, converter=readonly, hash=False)
    source: str = NO_REQUIREMENTS_SOURCE
    pattern_sources: Mapping[str, str] = attrs.field(factory=dict, converter=readonly, hash=False)
    allowed_ranges: tuple[str, ...] = ()
    denied_ranges: tuple[str, ...] = ()


def parse_requirements(data: bytes, source: str) -> Requirements:
    """
    Read a requirements file: its C{[experimental_network]} table is
    validated as strictly as the network section; other tables belong to
    codex. A file without the table imposes nothing.

    @raise ConfigError: on any mistake, naming C{source}, the dotted key and
        the value.
    """
    document = load_toml(data, source)
    table = Table(document, source, "").table(_REQUIREMENTS_TABLE)
    table.check_keys(_REQUIREMENTS_KEYS)
    allowed, denied = pattern_lists(table)
    ceilings: dict[str, Any] = {}
    for name in _CEILING_KEYS:
        value = table.mode(name) if name == "mode" else table.boolean(name, None)
        if value is not None:
            ceilings[name] = value
    allowed_ranges = address_ranges(table, "allowed_ranges")
    denied_ranges = address_ranges(table, "denied_ranges")
    return Requirements(
        allowed_domains=tuple(allowed),
        denied_domains=tuple(denied),
        managed_allowed_domains_only=table.boolean("managed_allowed_domains_only", False),
        ceilings=ceilings,
        source=source,
        pattern_sources={**allowed, **denied, **allowed_ranges, **denied_ranges},
        allowed_ranges=tuple(allowed_ranges),
        denied_ranges=tuple(denied_ranges),
    )


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


def _ignored(
    requirements: Requirements,
    config: ProxyConfig,
    what: str,
    user: Iterable[str],
    managed: Container[str],
) -> tuple[str, ...]:
    """
    The warning, if any, that the C{user} entries of C{config} missing from
    the C{managed} ones are ignored under C{managed_allowed_domains_only}.
    """
    ignored = [text for text in user if text not in managed]
    if not ignored:
        return ()
    return (
        f"{requirements.source}: {_REQUIREMENTS_TABLE}."
        f"managed_allowed_domains_only = true: ignoring {what} "
        "not in the managed allowlist: "
        + ", ".join(f"{text} ({config.pattern_sources[text]})" for text in ignored),
    )


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
        allowed = dict.fromkeys(requirements.allowed_domains)
        allowed_ranges = dict.fromkeys(requirements.allowed_ranges)
        for what, user, kept in (
            ("allowed patterns", config.allowed_domains, allowed),
            ("allowed_ranges", config.allowed_ranges, allowed_ranges),
        ):
            warnings += _ignored(requirements, config, what, user, kept)
    else:
        allowed = dict.fromkeys((*requirements.allowed_domains, *config.allowed_domains))
        allowed_ranges = dict.fromkeys((*requirements.allowed_ranges, *config.allowed_ranges))
    denied_ranges = dict.fromkeys((*requirements.denied_ranges, *config.denied_ranges))
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
    for text in (*allowed_ranges, *denied_ranges):
        sources[text] = managed.get(text) or config.pattern_sources[text]
    return attrs.evolve(
        config,
        **changes,
        allowed_domains=allowed_domains,
        denied_domains=tuple(denied),
        pattern_sources=sources,
        warnings=warnings,
        managed_allowed_domains_only=requirements.managed_allowed_domains_only,
        allowed_ranges=tuple(allowed_ranges),
        denied_ranges=tuple(denied_ranges),
    )


RULES_FILE = os.path.join("proxy", "network-rules.toml")
RUNTIME_SOURCE = "<runtime>"
NO_RULES_SOURCE = "<no remembered rules>"


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
    return os.path.join(codex_home(environ), RULES_FILE)


@attrs.frozen
class RememberedRules:
    """
    The remembered approvals file: canonical patterns, each list in file
    order, a pattern in both lists kept only as denied (fail closed).
    """

    allowed_domains: tuple[str, ...] = ()
    denied_domains: tuple[str, ...] = ()
    source: str = NO_RULES_SOURCE
    pattern_sources: Mapping[str, str] = attrs.field(factory=dict, converter=readonly, hash=False)

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
    table = Table(load_toml(data, source), source, "")
    table.check_keys(("allowed_domains", "denied_domains"))
    allowed, denied = pattern_lists(table)
    return RememberedRules(tuple(allowed), tuple(denied), source, {**allowed, **denied})


def load_rules(path: str) -> RememberedRules:
    """
    The remembered rules at C{path}; a missing file is an empty one.

    @raise ConfigError: the file exists but cannot be read or is invalid.
    """
    if not os.path.lexists(path):
        return RememberedRules(source=path)
    return parse_rules(read_file(path, "remembered rules file"), path)


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

    entries: Mapping[str, Action] = attrs.field(factory=dict, converter=readonly, hash=False)

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
    ranges = {text: where[text] for text in (*config.allowed_ranges, *config.denied_ranges)}
    user = attrs.evolve(
        config,
        allowed_domains=tuple(allowed),
        denied_domains=tuple(denied),
        pattern_sources={**allowed, **denied, **ranges},
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
        parsed = parse_pattern(pattern, deny=action is Action.DENY)
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
    managed = DomainSet(parse_pattern(text, deny=True) for text in requirements.denied_domains)
    covering = _covering_deny(managed, parsed)
    if covering is not None:
        raise RuleError(
            f"cannot allow {parsed.text!r}: managed requirements deny it "
            f"({requirements.pattern_sources[covering]}: {covering!r})"
        )
    return parsed.text


def _covering_deny(managed: DomainSet, pattern: Pattern) -> Optional[str]:
    """
    The managed deny pattern that matches every host and port C{pattern}
    would allow, if any: a deny on one port covers an allow on that port
    only. A partial overlap is no reason to refuse: the deny keeps winning
    where it applies.
    """
    kind, domain = pattern.kind, pattern.domain
    port = None if pattern.port == ANY_PORT else pattern.port
    # "*" is no hostname label, so this probe matches only subdomain wildcards.
    below = managed.match(f"*.{domain}", port)
    apex = managed.match(domain, port)
    if kind is PatternKind.EXACT:
        found = apex
    elif kind is PatternKind.SUBDOMAINS:
        found = below
    else:
        found = below if apex is not None else None
    return None if found is None else found.text
