"""
The live policy of a running proxy: reload from its files and runtime
additions (SPEC §2.5), both swapping the compiled policy of a
L{PolicyService} atomically for decisions started afterwards.

Files are read through an injected C{run_in_thread} (the reactor's thread
pool in a real process), so a reload never blocks the reactor thread on
disk I/O; the swap itself happens on the reactor thread.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import attrs

from twisted.internet import defer
from twisted.logger import Logger

from codex_proxy.config import ConfigError, ProxyConfig
from codex_proxy.policy import Policy
from codex_proxy.policyservice import PolicyService
from codex_proxy.rules import (
    Action,
    RuleError,
    RuntimeRules,
    SourcePaths,
    Sources,
    check_addition,
    describe_changes,
    effective_config,
    keep_listeners,
    load_sources,
    persist_rule,
)

_T = TypeVar("_T")
RunInThread = Callable[[Callable[[], _T]], "defer.Deferred[_T]"]

_log = Logger()


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
    ) -> None:
        """
        @param service: holds the policy compiled from C{sources} already.
        @param compile: turns an effective config into the policy to swap in.
        @param run_in_thread: runs a blocking callable off the reactor thread
            and returns a Deferred of its result.
        """
        self._service = service
        self._sources = sources
        self._paths = paths
        self._compile = compile
        self._run_in_thread = run_in_thread
        self._runtime = RuntimeRules()
        self._writes = defer.DeferredLock()
        self._reloads = defer.DeferredLock()
        self.config = effective_config(sources)

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
        self._swap(attrs.evolve(self._sources, config=config))

    def _reloadOnce(self) -> defer.Deferred[bool]:
        d = self._run_in_thread(lambda: load_sources(self._paths))
        d.addCallback(self._swap)
        d.addErrback(self._reloadFailed)
        return d

    def _swap(self, sources: Sources) -> bool:
        config = effective_config(sources, self._runtime)
        config, warnings = keep_listeners(self.config, config)
        for warning in (*warnings, *config.warnings):
            _log.warn("{warning}", warning=warning)
        changes = self._apply(sources, self._runtime, config)
        _log.info(
            "policy reloaded: {changes}",
            changes="; ".join(changes) if changes else "no change",
        )
        return True

    def _reloadFailed(self, failure: Any) -> bool:
        failure.trap(ConfigError)
        _log.error(
            "policy reload failed, previous policy kept: {error}",
            error=str(failure.value),
        )
        return False

    def _apply(
        self, sources: Sources, runtime: RuntimeRules, config: ProxyConfig
    ) -> tuple[str, ...]:
        """
        Compile C{config} and swap it in; returns what changed.
        """
        policy = self._compile(config)
        changes = describe_changes(self.config, config)
        self._service.reload(policy)
        self._sources, self._runtime, self.config = sources, runtime, config
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
        path: Optional[str] = self._paths.rules
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
        if not persist:
            return defer.succeed(None)
        d = self._writes.run(self._run_in_thread, lambda: persist_rule(path, text, action))
        d.addCallback(lambda _: None)
        return d
