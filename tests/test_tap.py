"""
The twistd plugin: option parsing, config errors, binding and the ports file.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock

from codex_proxy.config import parse_config
from codex_proxy.socks5 import SOCKS5Factory
from codex_proxy.tap import Options, ProxyService, makeService

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
    # SOCKS5 is on by default (SPEC §2.2), on its default address.
    (http, _, _, http_if), (socks, factory, _, socks_if) = reactor.tcpServers
    assert (http, http_if, socks, socks_if) == (0, "127.0.0.1", 8081, "127.0.0.1")
    assert isinstance(factory, SOCKS5Factory)
    assert json.loads(ports.read_text()) == {
        "http": service.addresses["http"],
        "socks": service.addresses["socks"],
    }
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


class RefusingSecondReactor(MemoryReactorClock):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        if self.tcpServers:
            raise error.CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


def test_failed_socks_bind_exits_1_naming_the_address(tmp_path, capsys):
    ports = tmp_path / "ports.json"
    reactor = RefusingSecondReactor()
    service = ProxyService(parse_config(ENABLED, "c.toml"), reactor, str(ports))
    with pytest.raises(SystemExit) as exc:
        service.startService()
    assert exc.value.code == 1
    assert "127.0.0.1:8081 (socks_url)" in capsys.readouterr().err
    assert not ports.exists()
