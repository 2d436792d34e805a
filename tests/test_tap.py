"""
The twistd plugin: option parsing, config errors, binding and the ports file.
"""

from __future__ import annotations

import gc
import json
import signal

import pytest
import pytest_twisted
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError

from codex_proxy.config import parse_config
from codex_proxy.api import ListenError
from codex_proxy.socks5 import SOCKS5Factory
from codex_proxy.tap import Options, assemble, makeService

ENABLED = b'[network]\nenabled = true\nproxy_url = "127.0.0.1:0"\nallowed_domains = ["a.test"]\n'


class RefusingReactor(MemoryReactorClock):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise error.CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_bad_config_exits_1_naming_the_key(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text('[network]\nmode = "fast"\n')
    with pytest.raises(SystemExit) as exc:
        Options().parseOptions(["--config", str(path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "config.toml: network.mode" in err and "'fast'" in err
    assert "Traceback" not in err


def test_missing_config_file_exits_1(tmp_path, capsys):
    with pytest.raises(SystemExit):
        Options().parseOptions(["--config", str(tmp_path / "nope.toml")])
    assert "nope.toml" in capsys.readouterr().err


def test_default_config_path_comes_from_codex_home(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_bytes(ENABLED)
    monkeypatch.setenv("CODEX_HOME", str(tmp_path))
    options = Options()
    options.parseOptions([])
    assert options.config.enabled
    assert options.config.allowed_domains == ("a.test",)


def test_makeService_uses_the_options(tmp_path):
    (tmp_path / "c.toml").write_bytes(ENABLED)
    options = Options()
    options.parseOptions(["--config", str(tmp_path / "c.toml"), "--ports-file", "p.json"])
    service = makeService(options)
    (proxy,) = [child for child in service if hasattr(child, "config")]
    assert proxy.config.allowed_domains == ("a.test",)


@pytest.mark.parametrize("given, seconds", [(None, 100e-6), ("0", 0.0), ("2500", 2500e-6), ("10000", 0.01)])
def test_busy_poll_option_reaches_the_proxy_service(tmp_path, given, seconds):
    (tmp_path / "c.toml").write_bytes(ENABLED)
    options = Options()
    options.parseOptions(["--config", str(tmp_path / "c.toml")] + (["--busy-poll-us", given] if given else []))
    (proxy,) = [child for child in makeService(options) if hasattr(child, "config")]
    assert proxy.busy_poll == pytest.approx(seconds)


@pytest.mark.parametrize("given", ["-1", "10001", "fast", "1.5", ""])
def test_a_bad_busy_poll_option_is_refused_naming_it(tmp_path, given):
    (tmp_path / "c.toml").write_bytes(ENABLED)
    with pytest.raises(UsageError) as e:
        Options().parseOptions(["--config", str(tmp_path / "c.toml"), "--busy-poll-us", given])
    assert str(e.value).startswith("--busy-poll-us: ") and repr(given) in str(e.value)


def test_enabled_binds_the_http_listener_and_writes_the_ports_file(tmp_path):
    reactor = MemoryReactorClock()
    ports = tmp_path / "ports.json"
    service = assemble(parse_config(ENABLED, "c.toml"), reactor, str(ports), environ={})
    service.startService()
    # SOCKS5 is on by default (SPEC §2.2), on its default address.
    (http, _, _, http_if), (socks, factory, _, socks_if) = reactor.tcpServers
    assert (http, http_if, socks, socks_if) == (0, "127.0.0.1", 8081, "127.0.0.1")
    assert isinstance(factory, SOCKS5Factory)
    (proxy,) = [child for child in service if hasattr(child, "addresses")]
    assert json.loads(ports.read_text()) == {
        "http": proxy.addresses["http"],
        "socks": proxy.addresses["socks"],
    }
    service.stopService()
    assert not ports.exists()


def test_disabled_binds_nothing_and_lists_no_listener(tmp_path):
    reactor = MemoryReactorClock()
    ports = tmp_path / "ports.json"
    service = assemble(
        parse_config(b"[network]\nenabled = false\n", "c.toml"), reactor, str(ports), environ={}
    )
    service.startService()
    assert reactor.tcpServers == []
    assert json.loads(ports.read_text()) == {}


def test_failed_bind_exits_1_naming_the_address(tmp_path, capsys):
    ports = tmp_path / "ports.json"
    config = parse_config(b'[network]\nenabled = true\nproxy_url = "127.0.0.1:3128"\n', "c.toml")
    service = assemble(config, RefusingReactor(), str(ports), environ={})
    with pytest.raises(SystemExit) as exc:
        service.startService()
    assert exc.value.code == 1
    assert "127.0.0.1:3128 (proxy_url)" in capsys.readouterr().err
    assert not ports.exists()


class SyncPool:
    """
    A thread pool that runs work at once, for deferToThreadPool.
    """

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException as e:  # handed back like the real pool does
            onResult(False, e)
        else:
            onResult(True, result)


class ThreadedMemoryReactor(MemoryReactorClock):
    """
    A memory reactor that records what a signal handler hands to the
    reactor thread instead of running it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fromThread = []

    def callFromThread(self, f, *args, **kwargs):
        self.fromThread.append((f, args, kwargs))


def test_requirements_option_caps_the_config(tmp_path):
    (tmp_path / "c.toml").write_bytes(ENABLED + b'mode = "full"\n')
    (tmp_path / "r.toml").write_text(
        '[experimental_network]\nallowed_domains = ["m.test"]\nallow_upstream_proxy = false\n'
    )
    options = Options()
    options.parseOptions(
        ["--config", str(tmp_path / "c.toml"), "--requirements", str(tmp_path / "r.toml")]
    )
    assert options.config.allowed_domains == ("m.test", "a.test")
    assert options.config.allow_upstream_proxy is False


def test_ceiling_exceeded_exits_1_naming_both_files(tmp_path, capsys):
    (tmp_path / "c.toml").write_bytes(ENABLED + b'mode = "full"\n')
    (tmp_path / "r.toml").write_text('[experimental_network]\nmode = "limited"\n')
    with pytest.raises(SystemExit) as exc:
        Options().parseOptions(
            ["--config", str(tmp_path / "c.toml"), "--requirements", str(tmp_path / "r.toml")]
        )
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert 'c.toml: network.mode: "full" exceeds the managed ceiling' in err
    assert 'r.toml: experimental_network.mode = "limited"' in err
    assert "Traceback" not in err


def test_broken_remembered_rules_stop_start_up(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.toml").write_bytes(ENABLED)
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "network-rules.toml").write_text('allowed_domains = ["*"]\n')
    monkeypatch.setenv("CODEX_HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        Options().parseOptions([])
    assert "network-rules.toml: allowed_domains[0]" in capsys.readouterr().err


def test_sighup_reloads_on_the_reactor_thread_while_running(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEX_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_bytes(ENABLED)
    options = Options()
    options.parseOptions([])
    reactor = ThreadedMemoryReactor()
    reactor.getThreadPool = lambda: SyncPool()
    top = assemble(options.config, reactor, sources=options.sources, paths=options.paths)
    before = signal.getsignal(signal.SIGHUP)

    top.startService()
    (proxy_service,) = [s for s in top if hasattr(s, "proxy")]
    (tmp_path / "config.toml").write_bytes(ENABLED.replace(b'"a.test"', b'"b.test"'))
    signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
    # The handler only hands the reload to the reactor thread.
    assert proxy_service.proxy.config.allowed_domains == ("a.test",)
    assert len(reactor.fromThread) == 1
    while reactor.fromThread:  # run it, and the thread pool's hand-backs
        f, args, kwargs = reactor.fromThread.pop(0)
        f(*args, **kwargs)
    assert proxy_service.proxy.config.allowed_domains == ("b.test",)
    top.stopService()

    assert signal.getsignal(signal.SIGHUP) == before


def test_a_reload_that_adds_a_secret_rewrites_the_ports_file_with_its_placeholder(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEX_HOME", str(tmp_path))
    monkeypatch.setenv("FIRST_VALUE", "first-secret-value-1234")
    monkeypatch.setenv("SECOND_VALUE", "second-secret-value-5678")
    first = b'[network.secrets.FIRST]\nsource = "env:FIRST_VALUE"\nhosts = ["a.test"]\n'
    second = b'[network.secrets.SECOND]\nsource = "env:SECOND_VALUE"\nhosts = ["a.test"]\n'
    (tmp_path / "config.toml").write_bytes(ENABLED + first)
    ports = tmp_path / "ports.json"
    options = Options()
    options.parseOptions(["--ports-file", str(ports)])
    reactor = ThreadedMemoryReactor()
    reactor.getThreadPool = lambda: SyncPool()
    top = assemble(
        options.config,
        reactor,
        str(ports),
        sources=options.sources,
        paths=options.paths,
        interception=options.interception,
    )
    top.startService()
    before = json.loads(ports.read_text())["placeholders"]
    assert list(before) == ["FIRST"]

    (tmp_path / "config.toml").write_bytes(ENABLED + first + second)
    signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
    while reactor.fromThread:
        f, args, kwargs = reactor.fromThread.pop(0)
        f(*args, **kwargs)
    after = json.loads(ports.read_text())["placeholders"]
    assert sorted(after) == ["FIRST", "SECOND"]
    # The first keeps its placeholder: children already hold it.
    assert after["FIRST"] == before["FIRST"]
    assert "secret-value" not in ports.read_text()
    top.stopService()
    assert not ports.exists()


def test_a_reload_that_ends_after_the_stop_leaves_no_ports_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEX_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_bytes(ENABLED)
    ports = tmp_path / "ports.json"
    options = Options()
    options.parseOptions([])
    reactor = ThreadedMemoryReactor()
    reactor.getThreadPool = lambda: SyncPool()
    top = assemble(options.config, reactor, str(ports), sources=options.sources, paths=options.paths)
    top.startService()
    handler = signal.getsignal(signal.SIGHUP)
    handler(signal.SIGHUP, None)
    top.stopService()
    assert not ports.exists()
    while reactor.fromThread:
        f, args, kwargs = reactor.fromThread.pop(0)
        f(*args, **kwargs)
    assert not ports.exists()


class RefusingSecondReactor(MemoryReactorClock):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        if self.tcpServers:
            raise error.CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


def test_failed_socks_bind_exits_1_naming_the_address(tmp_path, capsys):
    ports = tmp_path / "ports.json"
    reactor = RefusingSecondReactor()
    service = assemble(parse_config(ENABLED, "c.toml"), reactor, str(ports), environ={})
    with pytest.raises(SystemExit) as exc:
        service.startService()
    assert exc.value.code == 1
    assert "127.0.0.1:8081 (socks_url)" in capsys.readouterr().err
    assert not ports.exists()


def test_failed_bind_when_daemonizing_raises_for_the_waiting_parent(tmp_path):
    """
    A daemonizing twistd reports an exception from start-up to its parent,
    which prints it and exits 1; a SystemExit would leave the parent waiting.
    """
    config = parse_config(b'[network]\nenabled = true\nproxy_url = "127.0.0.1:3128"\n', "c.toml")
    service = assemble(config, RefusingReactor(), str(tmp_path / "p.json"), environ={}, daemon=True)
    with pytest.raises(ListenError, match=r"127\.0\.0\.1:3128 \(proxy_url\)"):
        service.startService()
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("argv, daemon", [(["-n"], False), ([], True)])
def test_makeService_knows_whether_twistd_daemonizes(tmp_path, argv, daemon):
    from twisted.scripts.twistd import ServerOptions

    (tmp_path / "c.toml").write_bytes(ENABLED)
    server = ServerOptions()
    server.parseOptions([*argv, "codexproxy", "--config", str(tmp_path / "c.toml")])
    top = makeService(server.subOptions)
    (proxy,) = [child for child in top if hasattr(child, "addresses")]
    assert proxy._exit_on_error is not daemon


NESTED = "x = " + "[" * 3000 + "]" * 3000 + "\n"


@pytest.mark.parametrize("nested", ["config", "requirements"])
def test_deeply_nested_toml_exits_1_naming_the_file(tmp_path, capsys, nested):
    """
    A value nested deeper than the parser follows is a config error like
    any other: one line naming the file, no RecursionError traceback.
    """
    files = {"config": tmp_path / "c.toml", "requirements": tmp_path / "r.toml"}
    files["config"].write_bytes(ENABLED)
    files["requirements"].write_text("[experimental_network]\n")
    files[nested].write_text(NESTED)
    with pytest.raises(SystemExit) as exc:
        Options().parseOptions(
            ["--config", str(files["config"]), "--requirements", str(files["requirements"])]
        )
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err == f"codexproxy: config error: {files[nested]}: invalid TOML: values nested too deeply\n"


def test_a_started_proxy_leaves_what_it_built_out_of_garbage_collections_until_stopped(tmp_path):
    service = assemble(parse_config(ENABLED, "c.toml"), MemoryReactorClock(), str(tmp_path / "p.json"), environ={})
    gc.unfreeze()
    service.startService()
    assert gc.get_freeze_count() > 0
    service.stopService()
    assert gc.get_freeze_count() == 0


@pytest_twisted.inlineCallbacks
def test_a_started_proxy_sends_writes_at_the_end_of_the_reactors_turn_until_stopped(tmp_path):
    from twisted.internet import endpoints, reactor
    from twisted.internet.protocol import Factory

    from support.ends import End

    plain = type(reactor)
    config = ENABLED + b"enable_socks5 = false\n"
    service = assemble(parse_config(config, "c.toml"), reactor, str(tmp_path / "p.json"), environ={})
    service.startService()
    try:
        assert type(reactor) is not plain and isinstance(reactor, plain)
        port = int(json.loads((tmp_path / "p.json").read_text())["http"].rsplit(":", 1)[1])
        client = End(closeOnEOF=True)
        yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
        client.transport.write(b"GET http://blocked.invalid/ HTTP/1.1\r\nHost: blocked.invalid\r\nConnection: close\r\n\r\n")
        yield client.lost
        assert bytes(client.received).startswith(b"HTTP/1.1 403 ")
    finally:
        yield service.stopService()
    assert type(reactor) is plain
