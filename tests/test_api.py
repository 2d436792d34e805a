"""
The embedding API (SPEC §9.1, §10) on a memory reactor: the builder, env,
blocked history, reload, listen errors and ProxyService. Runs on the real
reactor are in C{tests/e2e/test_api_reactor.py}.
"""

from __future__ import annotations

from typing import List

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from codex_proxy.api import ListenError, NetworkProxy, ProxyService
from codex_proxy.childenv import EnvError
from codex_proxy.config import parse_config
from codex_proxy.decider import Deny

CONFIG = parse_config(
    b'[network]\nenabled = true\nproxy_url = "127.0.0.1:0"\nenable_socks5 = false\n'
    b'allowed_domains = ["127.0.0.1"]\n',
    "c.toml",
)


def test_build_defaults_to_a_disabled_proxy_that_binds_nothing():
    reactor = MemoryReactorClock()
    proxy = NetworkProxy.builder().reactor(reactor).build().result
    handle = proxy.run().result
    assert (handle.http_addr, handle.socks_addr) == (None, None)
    assert reactor.tcpServers == []


def test_non_loopback_address_needs_the_config_to_allow_it():
    d = NetworkProxy.builder().config(CONFIG).http_addr("0.0.0.0:0").build()
    failure = d.result
    d.addErrback(lambda f: None)
    assert "0.0.0.0:0 is not on loopback" in str(failure.value)
    with pytest.raises(ValueError, match="port"):
        NetworkProxy.builder().http_addr("127.0.0.1")


def test_running_twice_fails():
    reactor = MemoryReactorClock()
    proxy = NetworkProxy.builder().config(CONFIG).reactor(reactor).build().result
    proxy.run()
    d = proxy.run()
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(RuntimeError)


def test_env_points_children_at_the_bound_addresses():
    reactor = MemoryReactorClock()
    proxy = NetworkProxy.builder().config(CONFIG).reactor(reactor).build().result
    with pytest.raises(EnvError, match="ephemeral port"):
        proxy.env()  # port 0 is known only once bound
    handle = proxy.run().result
    env = proxy.env()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "WS_PROXY", "WSS_PROXY"):
        assert env[name] == env[name.lower()] == f"http://{handle.http_addr}"
    assert env["NO_PROXY"] == env["no_proxy"] == ""
    assert env["ALL_PROXY"] == env["all_proxy"] == f"http://{handle.http_addr}"
    for name in ("FTP_PROXY", "npm_config_proxy", "npm_config_https_proxy",
                 "YARN_HTTP_PROXY", "YARN_HTTPS_PROXY"):
        assert env[name] == f"http://{handle.http_addr}"
    for name in ("NODE_USE_ENV_PROXY", "ELECTRON_GET_USE_PROXY", "CODEX_NETWORK_PROXY_ACTIVE"):
        assert env[name] == "1"


def test_env_with_socks_local_binding_and_a_ca_bundle():
    from codex_proxy.mitm import Interception

    config = parse_config(
        b'[network]\nenabled = true\nproxy_url = "127.0.0.1:3128"\nsocks_url = "127.0.0.1:8081"\n'
        b"allow_local_binding = true\nmitm = true\n",
        "c.toml",
    )
    interception = Interception(ca=None, trust=None, bundle="/tmp/bundle.pem")
    proxy = (
        NetworkProxy.builder()
        .config(config)
        .reactor(MemoryReactorClock())
        .interception(interception)
        .build()
        .result
    )
    env = proxy.env()
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://127.0.0.1:8081"
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    assert env["SSL_CERT_FILE"] == env["CURL_CA_BUNDLE"] == "/tmp/bundle.pem"


def test_blocked_and_reload():
    reactor = MemoryReactorClock()
    proxy = (
        NetworkProxy.builder()
        .config(CONFIG)
        .reactor(reactor)
        .policy_decider(lambda request: Deny("no"))
        .audit_metadata({"conversation.id": "c-1"})
        .build()
        .result
    )
    from codex_proxy.model import Protocol, ProxyRequest

    proxy.policy.check(ProxyRequest(Protocol.HTTP, "a.test", 80, method="GET"))
    (entry,) = proxy.blocked()
    assert (entry.host, entry.detail) == ("a.test", "no")

    warnings: List[str] = []

    def observer(event: dict) -> None:
        if "cannot change on a running proxy" in event.get("warning", ""):
            warnings.append(event["warning"].split(": ")[1])

    new = parse_config(
        b'[network]\nenabled = true\nproxy_url = "127.0.0.1:9"\nallowed_domains = ["a.test"]\n',
        "c.toml",
    )
    globalLogPublisher.addObserver(observer)
    try:
        proxy.reload(new)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert warnings == ["network.proxy_url", "network.enable_socks5"]
    assert str(proxy.config.http_listen) == "127.0.0.1:0"
    assert proxy.config.allowed_domains == ("a.test",)
    assert proxy.policy.policy.allowed.match("a.test") is not None


def test_listen_error_names_the_address():
    from twisted.internet import error

    class Refusing(MemoryReactorClock):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            raise error.CannotListenError(interface, port, OSError(98, "in use"))

    proxy = NetworkProxy.builder().config(CONFIG).reactor(Refusing()).build().result
    d = proxy.run()
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(ListenError)
    assert "127.0.0.1:0 (proxy_url)" in failure.getErrorMessage()


def test_proxy_service_runs_and_stops():
    reactor = MemoryReactorClock()
    service = ProxyService(NetworkProxy.builder().config(CONFIG).reactor(reactor).create())
    service.startService()
    assert set(service.addresses) == {"http"}
    assert len(reactor.tcpServers) == 1
    d = service.stopService()
    assert d.called


def test_reload_without_files_keeps_the_policy_and_says_why():
    reactor = _InlineThreadsReactor()
    proxy = NetworkProxy.builder().config(CONFIG).reactor(reactor).build().result
    errors: List[str] = []

    def observer(event: dict) -> None:
        if event.get("log_format", "").startswith("policy reload failed"):
            errors.append(event["error"])

    globalLogPublisher.addObserver(observer)
    try:
        outcome = []
        proxy.reload().addCallback(outcome.append)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert outcome == [False]
    assert errors and "config object, not a file" in errors[0]
    assert proxy.config.allowed_domains == ("127.0.0.1",)


class _InlineThreadsReactor(MemoryReactorClock):
    """
    Runs "thread pool" work and its hand-back at once.
    """

    def getThreadPool(self):
        return _InlinePool()

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class _InlinePool:
    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException as e:
            onResult(False, e)
        else:
            onResult(True, result)
