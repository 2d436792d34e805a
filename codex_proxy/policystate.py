"""
The live policy of a running proxy: reload from its files and runtime
additions (SPEC §2.5), both swapping the compiled policy of a
L{PolicyService} atomically for decisions started afterwards. Where a
policy comes from is L{codex_proxy.sources}'; this module is the swap, what
a reload may change, and what it reports.

Files are read through an injected C{run_in_thread} (the reactor's thread
pool in a real process), so a reload never blocks the reactor thread on
disk I/O; the swap itself happens on the reactor thread.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Optional, TypeVar

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from codex_proxy.config import ConfigError, ProxyConfig
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.secrets import Secret, Secrets
from codex_proxy.sources import (
    Action,
    RuleError,
    RuntimeRules,
    SourcePaths,
    Sources,
    check_addition,
    effective_config,
    load_sources,
    persist_rule,
)

_T = TypeVar("_T")
RunInThread = Callable[[Callable[[], _T]], "defer.Deferred[_T]"]

_log = Logger()

#: Keys fixed for the life of a process (SPEC §2.5), as ProxyConfig fields.
#: C{enabled} is not one: a running proxy can be disabled and enabled again.
LISTENER_FIELDS = (
    "http_listen",
    "socks_listen",
    "enable_socks5",
    "enable_socks5_udp",
    "dns_listen",
    "admin_listen",
)
#: Fields whose change a reload reports, besides the domain lists.
_REPORTED_FIELDS = (
    "enabled",
    "mode",
    "mitm",
    "allow_local_binding",
    "allow_upstream_proxy",
    "managed_allowed_domains_only",
    "allow_unix_sockets",
    "dangerously_allow_all_unix_sockets",
    "dangerously_allow_plaintext_secrets",
    "require_client_auth",
)


class PolicyState:
    """
    The sources of a running proxy's policy and the runtime additions made
    since it started.

    @ivar config: the effective config in force (listener keys and limits as
        at start).
    """

    def __init__(
        self,
        service: PolicyService,
        sources: Sources,
        paths: SourcePaths,
        *,
        compile: Callable[[ProxyConfig], Policy],
        run_in_thread: RunInThread[Any],
        disabled: Callable[[], None] = lambda: None,
        secrets: Optional[Secrets] = None,
    ) -> None:
        """
        @param service: holds the policy compiled from C{sources} already.
        @param compile: turns an effective config into the policy to swap in.
        @param run_in_thread: runs a blocking callable off the reactor thread
            and returns a Deferred of its result.
        @param disabled: called when a reload disables a running proxy, after
            the disabled policy is in force (it closes the open tunnels).


        @param secrets: reloaded with the policy, their values read with the
            files (SPEC §12): a secret that cannot be read keeps both.
        """
        self._service = service
        self._sources = sources
        self._paths = paths
        self._compile = compile
        self._run_in_thread = run_in_thread
        self._disabled = disabled
        self._secrets = secrets if secrets is not None else Secrets()
        self._runtime = RuntimeRules()
        self._writes = defer.DeferredLock()
        self._reloads = defer.DeferredLock()
        self.config = effective_config(sources)
        self._started_enabled = self.config.enabled

    def reload(self) -> defer.Deferred[bool]:
        """
        Re-read the config, the requirements and the remembered rules, and
        swap in their policy; runtime additions stay in force. An invalid
        source is logged (naming file and key) and the old policy kept.

        Reloads run one at a time, so the files read last are the ones in
        force.

        @return: a Deferred firing C{True} when the new policy is in force,
            C{False} when the old one was kept; it never fails.
        """
        return self._reloads.run(self._reloadOnce)

    def replace(self, config: ProxyConfig) -> None:
        """
        Decide by C{config} from now on, with the same requirements,
        remembered rules and runtime additions (the embedding API's reload
        with a config object); listener keys keep their running values.

        @raise ConfigError: C{config} exceeds a managed ceiling; nothing changed.
        """
        self._swap(attrs.evolve(self._sources, config=config), self._secrets.read(config.secrets))

    def _reloadOnce(self) -> defer.Deferred[bool]:
        d = self._run_in_thread(self._read)
        d.addCallback(lambda read: self._swap(*read))
        d.addErrback(self._reloadFailed)
        return d

    def _read(self) -> tuple[Sources, tuple[Secret, ...]]:
        """
        The files and the secrets' values they name (blocking I/O).
        """
        sources = load_sources(self._paths)
        return sources, self._secrets.read(sources.config.secrets)

    def _swap(self, sources: Sources, secrets: tuple[Secret, ...]) -> bool:
        config = effective_config(sources, self._runtime)
        config, warnings = keep_listeners(self.config, config)
        if config.enabled and not self._started_enabled:
            config = attrs.evolve(config, enabled=False)
            warnings += (
                f"{config.source}: {config.section}.enabled: changed to true, but a"
                " proxy started disabled has no listeners; keeping false until restart",
            )
        for warning in (*warnings, *config.warnings):
            _log.warn("{warning}", warning=warning)
        changes = self._apply(sources, self._runtime, config)
        self._secrets.install(secrets)
        _log.info(
            "policy reloaded: {changes}",
            changes="; ".join(changes) if changes else "no change",
        )
        return True

    def _reloadFailed(self, failure: Failure) -> bool:
        """
        Log why a reload failed, whatever it was, and keep the old policy: a
        file's mistake in one line naming it, anything else with its
        traceback.
        """
        if failure.check(ConfigError):
            _log.error(
                "policy reload failed, previous policy kept: {error}",
                error=str(failure.value),
            )
        else:
            _log.failure("policy reload failed, previous policy kept", failure)
        return False

    def _apply(
        self, sources: Sources, runtime: RuntimeRules, config: ProxyConfig
    ) -> tuple[str, ...]:
        """
        Compile C{config} and swap it in; returns what changed.
        """
        policy = self._compile(config)
        changes = describe_changes(self.config, config)
        was_enabled = self.config.enabled
        self._service.reload(policy)
        self._sources, self._runtime, self.config = sources, runtime, config
        if was_enabled and not config.enabled:
            _log.warn(
                "codex-proxy disabled by reload (enabled = false in {source}): listeners"
                " stay bound, every new request is refused, open tunnels are closed",
                source=config.source,
            )
            self._disabled()
        return changes

    def add_allowed_domain(self, pattern: str, persist: bool = False) -> defer.Deferred[None]:
        """
        Allow C{pattern} from now on, removing it from the user denylists.

        @param persist: also remember it in the rules file.
        @raise RuleError: the pattern is invalid, managed requirements forbid
            it, or C{persist} is asked without a rules file; nothing changed.
        @return: a Deferred firing once the rule is on disk (at once when
            not persisted); it fails with the write's error.
        """
        return self._add(pattern, Action.ALLOW, persist)

    def add_denied_domain(self, pattern: str, persist: bool = False) -> defer.Deferred[None]:
        """
        Deny C{pattern} from now on, removing it from the user allowlists;
        see L{add_allowed_domain}.
        """
        return self._add(pattern, Action.DENY, persist)

    def _add(self, pattern: str, action: Action, persist: bool) -> defer.Deferred[None]:
        text = check_addition(self._sources.requirements, pattern, action)
        path = self._paths.rules
        if persist and path is None:
            raise RuleError(f"cannot remember {text!r}: no rules file configured")
        runtime = self._runtime.add(text, action)
        config = effective_config(self._sources, runtime)
        self._apply(self._sources, runtime, config)
        _log.info(
            "runtime rule added: {action} {pattern}{remembered}",
            action=action.value,
            pattern=text,
            remembered=f" (remembered in {path})" if persist else "",
        )
        if not persist or path is None:
            return defer.succeed(None)
        return self._writes.run(self._persist, path, text, action)

    def _persist(self, path: str, pattern: str, action: Action) -> defer.Deferred[None]:
        """
        Remember one rule in the file at C{path}, off the reactor thread.
        """
        d = self._run_in_thread(lambda: persist_rule(path, pattern, action))
        return d.addCallback(lambda _: None)


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
    return {
        "http_listen": "proxy_url",
        "socks_listen": "socks_url",
        "dns_listen": "dns_url",
        "admin_listen": "admin_url",
    }.get(name, name)


def _show(value: Any) -> str:
    if value is None:
        return "unset"
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
    # Names only: a rotated token shows as a changed client, never itself.
    gone = {client.name for client in old.clients}
    changed = {client.name for client in new.clients if client not in old.clients}
    changed |= gone - {client.name for client in new.clients}
    if changed:
        changes.append("clients changed: " + ", ".join(sorted(changed)))
    return tuple(changes)
