"""
The twistd plugin: option parsing, config errors, binding and the ports file.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock

from codex_proxy.config import parse_config
from codex_proxy.tap import Options, ProxyService, StartupError, makeService

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
    assert service.config.allowed_domains == ("a.test",)


def test_enabled_binds_the_http_listener_and_writes_the_ports_file(tmp_path):
    reactor = MemoryReactorClock()
    ports = tmp_path / "ports.json"
    service = ProxyService(parse_config(ENABLED, "c.toml"), reactor, str(ports))
    service.startService()
    ((port, _factory, _backlog, interface),) = reactor.tcpServers
    assert (port, interface) == (0, "127.0.0.1")
    assert json.loads(ports.read_text()) == {"http": service.addresses["http"]}
    service.stopService()
    assert not ports.exists()


def test_disabled_binds_nothing_and_lists_no_listener(tmp_path):
    reactor = MemoryReactorClock()
    ports = tmp_path / "ports.json"
    service = ProxyService(parse_config(b"[network]\nenabled = false\n", "c.toml"), reactor, str(ports))
    service.startService()
    assert reactor.tcpServers == []
    assert json.loads(ports.read_text()) == {}


def test_failed_bind_exits_1_naming_the_address(tmp_path, capsys):
    ports = tmp_path / "ports.json"
    config = parse_config(b'[network]\nenabled = true\nproxy_url = "127.0.0.1:3128"\n', "c.toml")
    service = ProxyService(config, RefusingReactor(), str(ports))
    with pytest.raises(SystemExit) as exc:
        service.startService()
    assert exc.value.code == 1
    assert "127.0.0.1:3128 (proxy_url)" in capsys.readouterr().err
    assert not ports.exists()


def test_privileged_start_binds_once_before_start(tmp_path):
    """
    twistd calls privilegedStartService before it reports a successful
    start; startService then finds the listener already bound.
    """
    reactor = MemoryReactorClock()
    ports = tmp_path / "ports.json"
    service = ProxyService(parse_config(ENABLED, "c.toml"), reactor, str(ports))
    service.privilegedStartService()
    assert len(reactor.tcpServers) == 1
    assert json.loads(ports.read_text()) == {"http": service.addresses["http"]}
    service.startService()
    assert len(reactor.tcpServers) == 1


def test_failed_bind_when_daemonizing_raises_for_the_waiting_parent(tmp_path):
    """
    A daemonizing twistd reports an exception from start-up to its parent,
    which prints it and exits 1; a SystemExit would leave the parent waiting.
    """
    config = parse_config(b'[network]\nenabled = true\nproxy_url = "127.0.0.1:3128"\n', "c.toml")
    service = ProxyService(config, RefusingReactor(), str(tmp_path / "p.json"), daemon=True)
    with pytest.raises(StartupError, match=r"127\.0\.0\.1:3128 \(proxy_url\)"):
        service.privilegedStartService()


@pytest.mark.parametrize("argv, daemon", [(["-n"], False), ([], True)])
def test_makeService_knows_whether_twistd_daemonizes(tmp_path, argv, daemon):
    from twisted.scripts.twistd import ServerOptions

    (tmp_path / "c.toml").write_bytes(ENABLED)
    server = ServerOptions()
    server.parseOptions([*argv, "codexproxy", "--config", str(tmp_path / "c.toml")])
    assert makeService(server.subOptions)._daemon is daemon
