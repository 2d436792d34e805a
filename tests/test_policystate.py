"""
Tests for L{codex_proxy.policystate.PolicyState}: reloads and runtime
additions as the next decision's audit event shows them, what the log says,
and remembered approvals surviving a restart (SPEC §2.5).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, List, Optional

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from codex_proxy.config import ListenAddress
from codex_proxy.model import Protocol, ProxyRequest
from codex_proxy.policyservice import PolicyService
from codex_proxy.policystate import PolicyState
from codex_proxy.policy import policy_from_config
from codex_proxy.sources import RuleError, SourcePaths, effective_config, load_rules, load_sources
from codex_proxy.testing import RecordingAuditor, StaticResolver

PUBLIC = "198.51.99.7"
HOSTS = ("a.example", "b.example", "m.example")
COMPILE = functools.partial(policy_from_config, realpath=os.path.realpath)


@pytest.fixture
def log() -> List[str]:
    """
    The text of every log event of the test.
    """
    lines: List[str] = []

    def observer(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def run_now(f: Callable[[], Any]) -> defer.Deferred:
    return defer.maybeDeferred(f)


class Proxy:
    """
    A policy service with its live state, built from files like the real
    process builds it.
    """

    def __init__(
        self,
        home: Path,
        config: Optional[str] = None,
        requirements: Optional[str] = None,
        run_in_thread: Callable[[Callable[[], Any]], defer.Deferred] = run_now,
        remember: bool = True,
    ) -> None:
        self.config_path = home / "config.toml"
        if config is not None:
            self.config_path.write_text(config)
        self.requirements_path = home / "req.toml"
        if requirements is not None:
            self.requirements_path.write_text(requirements)
        self.rules_path = home / "proxy" / "network-rules.toml"
        paths = SourcePaths(
            str(self.config_path),
            str(self.requirements_path) if self.requirements_path.exists() else None,
            str(self.rules_path) if remember else None,
        )
        sources = load_sources(paths)
        clock = MemoryReactorClock()
        self.auditor = RecordingAuditor(clock.seconds)
        self.service = PolicyService(
            COMPILE(effective_config(sources)),
            resolver=StaticResolver({host: [PUBLIC] for host in HOSTS}),
            clock=clock,
            auditor=self.auditor,
        )
        self.disabled: List[str] = []
        self.state = PolicyState(
            self.service,
            sources,
            paths,
            compile=COMPILE,
            run_in_thread=run_in_thread,
            disabled=lambda: self.disabled.append("tunnels closed"),
        )

    def decide(self, host: str) -> str:
        """
        The audited decision and reason of a GET to C{host}.
        """
        self.service.check(ProxyRequest(Protocol.HTTP, host, 80, method="GET"))
        event = self.auditor.events[-1]
        return f"{event['network.policy.decision']} {event['network.policy.reason']}"

    def reload(self) -> bool:
        results: List[bool] = []
        self.state.reload().addCallback(results.append)
        [result] = results
        return result


def config(allowed=("a.example",), denied=(), extra: str = "") -> str:
    quoted = lambda items: "[" + ", ".join(f'"{i}"' for i in items) + "]"
    return (
        "[network]\nenabled = true\n"
        f"allowed_domains = {quoted(allowed)}\ndenied_domains = {quoted(denied)}\n{extra}"
    )


ALLOW = "allow allowed"
NOT_ALLOWED = "deny not_allowed"
DENIED = "deny denied"


def test_reload_swaps_the_policy_and_logs_what_changed(tmp_path, log):
    proxy = Proxy(tmp_path, config())
    assert proxy.decide("a.example") == ALLOW
    proxy.config_path.write_text(config(allowed=["b.example"], denied=["a.example"], extra='mode = "limited"\n'))

    assert proxy.reload() is True

    assert proxy.decide("a.example") == DENIED
    assert proxy.decide("b.example") == ALLOW
    assert (
        "policy reloaded: allowed_domains +b.example -a.example; denied_domains +a.example;"
        " mode 'full' -> 'limited'"
    ) in log


def test_reload_without_changes_says_so(tmp_path, log):
    proxy = Proxy(tmp_path, config())
    assert proxy.reload() is True
    assert "policy reloaded: no change" in log


@pytest.mark.parametrize(
    "broken, named",
    [
        ('[network]\nmode = "fast"\n', "config.toml: network.mode: unknown value 'fast'"),
        ("[network\n", "config.toml: invalid TOML"),
        (None, "config.toml: cannot read config file"),
    ],
)
def test_invalid_config_keeps_the_old_policy_and_logs_the_error(tmp_path, log, broken, named):
    proxy = Proxy(tmp_path, config())
    if broken is None:
        proxy.config_path.unlink()
    else:
        proxy.config_path.write_text(broken)

    assert proxy.reload() is False

    assert proxy.decide("a.example") == ALLOW
    [line] = [line for line in log if line.startswith("policy reload failed")]
    assert line.startswith("policy reload failed, previous policy kept: ")
    assert named in line


def test_new_ceiling_the_config_exceeds_keeps_the_old_policy(tmp_path, log):
    proxy = Proxy(tmp_path, config(extra="allow_local_binding = true\n"), "")
    proxy.requirements_path.write_text("[experimental_network]\nallow_local_binding = false\n")
    proxy.config_path.write_text(config(allowed=["b.example"], extra="allow_local_binding = true\n"))

    assert proxy.reload() is False

    assert proxy.decide("b.example") == NOT_ALLOWED
    [line] = [line for line in log if line.startswith("policy reload failed")]
    assert "network.allow_local_binding: true exceeds the managed ceiling" in line
    assert "req.toml: experimental_network.allow_local_binding = false" in line


def test_listener_keys_cannot_change_but_the_rest_reloads(tmp_path, log):
    proxy = Proxy(tmp_path, config(extra='proxy_url = "127.0.0.1:3128"\n'))
    proxy.config_path.write_text(
        config(allowed=["b.example"], extra='proxy_url = "127.0.0.1:4000"\n')
    )

    assert proxy.reload() is True

    assert proxy.state.config.http_listen == ListenAddress("127.0.0.1", 3128)
    assert proxy.decide("b.example") == ALLOW
    assert any("network.proxy_url: changed to 127.0.0.1:4000" in line for line in log)


def test_reload_disables_a_running_proxy_and_enables_it_again(tmp_path, log):
    """
    C{enabled = false} on reload refuses every new request as
    C{proxy_disabled} and closes the open tunnels; C{enabled = true} again
    restores service (SPEC §2.5).
    """
    proxy = Proxy(tmp_path, config())
    proxy.config_path.write_text(config().replace("enabled = true", "enabled = false"))

    assert proxy.reload() is True

    assert proxy.decide("a.example") == "deny proxy_disabled"
    assert proxy.auditor.events[-1]["network.policy.source"] == "proxy_state"
    assert proxy.disabled == ["tunnels closed"]
    assert "policy reloaded: enabled true -> false" in log
    proxy.config_path.write_text(config())
    assert proxy.reload() is True
    assert proxy.decide("a.example") == ALLOW
    assert proxy.disabled == ["tunnels closed"]


def test_a_proxy_started_disabled_stays_disabled(tmp_path, log):
    proxy = Proxy(tmp_path, config().replace("enabled = true", "enabled = false"))
    proxy.config_path.write_text(config())

    assert proxy.reload() is True

    assert proxy.decide("a.example") == "deny proxy_disabled"
    assert any(
        "network.enabled: changed to true, but a proxy started disabled" in line for line in log
    )


def test_runtime_additions_flip_lists_and_survive_a_reload(tmp_path, log):
    proxy = Proxy(tmp_path, config(denied=["b.example"]))

    proxy.state.add_allowed_domain("B.example")
    proxy.state.add_denied_domain("a.example")
    assert (proxy.decide("a.example"), proxy.decide("b.example")) == (DENIED, ALLOW)
    assert "runtime rule added: allow b.example" in log
    assert proxy.reload() is True
    assert (proxy.decide("a.example"), proxy.decide("b.example")) == (DENIED, ALLOW)
    assert not proxy.rules_path.exists()


@pytest.mark.parametrize(
    "requirements, pattern, message",
    [
        (
            '[experimental_network]\nallowed_domains = ["m.example"]\n'
            "managed_allowed_domains_only = true\n",
            "b.example",
            "the allowlist is managed",
        ),
        ('[experimental_network]\ndenied_domains = ["**.example"]\n', "b.example", "managed requirements deny it"),
        ("", "b.example:0", "invalid port"),
    ],
)
def test_runtime_allow_refused_changes_nothing(tmp_path, requirements, pattern, message):
    proxy = Proxy(tmp_path, config(), requirements)
    before = proxy.decide("b.example")
    with pytest.raises(RuleError, match=message):
        proxy.state.add_allowed_domain(pattern, persist=True)
    assert proxy.decide("b.example") == before
    assert not proxy.rules_path.exists()


def test_managed_only_with_empty_allowlist_blocks_everything(tmp_path):
    proxy = Proxy(tmp_path, config(allowed=HOSTS), "[experimental_network]\nmanaged_allowed_domains_only = true\n")
    assert [proxy.decide(host) for host in HOSTS] == [NOT_ALLOWED] * 3
    assert proxy.service.policy.managed_allowed_domains_only is True


def test_persisted_rules_are_written_off_thread_and_reloaded_after_a_restart(tmp_path):
    queued: List[Callable[[], Any]] = []

    def later(f: Callable[[], Any]) -> defer.Deferred:
        queued.append(f)
        return defer.Deferred()

    proxy = Proxy(tmp_path, config(denied=["b.example"]), run_in_thread=later)
    written: List[object] = []
    proxy.state.add_allowed_domain("b.example", persist=True).addBoth(written.append)
    proxy.state.add_denied_domain("a.example", persist=True).addBoth(written.append)

    # In force at once; the file is written only when the pool runs it, one
    # write at a time.
    assert (proxy.decide("a.example"), proxy.decide("b.example")) == (DENIED, ALLOW)
    assert not proxy.rules_path.exists() and written == [] and len(queued) == 1
    queued.pop()()
    assert len(queued) == 0  # the first write's Deferred has not fired yet

    again = Proxy(tmp_path)
    assert (again.decide("a.example"), again.decide("b.example")) == (ALLOW, ALLOW)

    synchronous = Proxy(tmp_path, config(denied=["b.example"]))
    synchronous.state.add_allowed_domain("b.example", persist=True)
    synchronous.state.add_denied_domain("a.example", persist=True)
    assert load_rules(str(synchronous.rules_path)).denied_domains == ("a.example",)
    restarted = Proxy(tmp_path)
    assert (restarted.decide("a.example"), restarted.decide("b.example")) == (DENIED, ALLOW)


def test_remembered_rules_are_read_on_reload(tmp_path, log):
    proxy = Proxy(tmp_path, config())
    proxy.rules_path.parent.mkdir()
    proxy.rules_path.write_text('allowed_domains = ["b.example"]\n')
    assert proxy.reload() is True
    assert proxy.decide("b.example") == ALLOW
    proxy.rules_path.write_text('allowed_domains = ["*"]\n')
    assert proxy.reload() is False
    assert any("network-rules.toml: allowed_domains[0]" in line for line in log)
    assert proxy.decide("b.example") == ALLOW


def test_persist_without_a_rules_file_is_refused(tmp_path):
    proxy = Proxy(tmp_path, config(), remember=False)
    with pytest.raises(RuleError, match="no rules file"):
        proxy.state.add_allowed_domain("b.example", persist=True)
    assert proxy.decide("b.example") == NOT_ALLOWED


def test_reloads_run_one_at_a_time_in_order(tmp_path, log):
    queued: List[Callable[[], Any]] = []
    pending: List[defer.Deferred] = []

    def later(f: Callable[[], Any]) -> defer.Deferred:
        queued.append(f)
        pending.append(defer.Deferred())
        return pending[-1]

    proxy = Proxy(tmp_path, config(), run_in_thread=later)
    first, second = proxy.state.reload(), proxy.state.reload()
    assert len(queued) == 1
    proxy.config_path.write_text(config(allowed=["b.example"]))
    pending[0].callback(queued[0]())
    assert len(queued) == 2
    proxy.config_path.write_text(config(allowed=["m.example"]))
    pending[1].callback(queued[1]())

    assert [first.result, second.result] == [True, True]
    assert proxy.decide("m.example") == ALLOW
    assert proxy.decide("b.example") == NOT_ALLOWED


def test_deeply_nested_toml_on_reload_is_logged_naming_the_file(tmp_path, log):
    proxy = Proxy(tmp_path, config())
    proxy.config_path.write_text("x = " + "[" * 3000 + "]" * 3000 + "\n")
    assert proxy.reload() is False
    [line] = [line for line in log if line.startswith("policy reload failed")]
    assert line.endswith(f"{proxy.config_path}: invalid TOML: values nested too deeply")
    assert proxy.decide("a.example") == ALLOW



def test_runtime_rules_with_ports_are_remembered_and_decide_per_port(tmp_path):
    proxy = Proxy(tmp_path, config(allowed=["**.example"]))
    proxy.state.add_allowed_domain("127.0.0.1:8000", persist=True)
    proxy.state.add_denied_domain("*:22", persist=True)
    rules = load_rules(str(proxy.rules_path))
    assert (rules.allowed_domains, rules.denied_domains) == (("127.0.0.1:8000",), ("*:22",))
    restarted = Proxy(tmp_path)
    for host, port in [("127.0.0.1", 8000), ("127.0.0.1", 8001), ("a.example", 22), ("a.example", 80)]:
        restarted.service.check(ProxyRequest(Protocol.HTTP, host, port, method="GET"))
    assert [
        f"{e['network.policy.decision']} {e['network.policy.reason']}"
        for e in restarted.auditor.events
    ] == [ALLOW, "deny not_allowed_local", DENIED, ALLOW]


def test_dns_url_cannot_change_on_a_running_proxy(tmp_path, log):
    proxy = Proxy(tmp_path, config(extra='dns_url = "127.0.0.1:5353"\n'))
    proxy.config_path.write_text(config())

    assert proxy.reload() is True

    assert proxy.state.config.dns_listen == ListenAddress("127.0.0.1", 5353)
    assert any(
        "network.dns_url: changed to unset, but it cannot change on a running proxy;"
        " keeping 127.0.0.1:5353 until restart" in line
        for line in log
    )
