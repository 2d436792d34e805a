"""
Daemon mode: C{twistd codexproxy} without C{-n}, stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest


def test_daemon_serves_then_stops_cleanly_on_sigterm(proxyproc, origin, curl, tmp_path):
    daemon = proxyproc.start_daemon(proxyproc.render_config({}), tmp_path / "daemon")
    try:
        assert daemon.pid != daemon.launcher.pid
        result = curl.run(origin.url("/bytes/1000"), proxy="http://" + daemon.ports["http"])
        assert (result.returncode, result.status) == (0, 200), result.stderr
        tunnel, _ = proxyproc.open_tunnel(daemon.http_addr, f"127.0.0.1:{origin.port}")

        started = time.monotonic()
        os.kill(daemon.pid, signal.SIGTERM)
        assert daemon.wait_exit(timeout=5) == 0
        assert time.monotonic() - started < 5

        with tunnel:
            tunnel.settimeout(5)
            try:
                assert tunnel.recv(1) == b""
            except ConnectionResetError:
                pass
        assert not daemon.pid_path.exists()
        assert not (tmp_path / "daemon" / "ports.json").exists()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(daemon.http_addr, timeout=5)
        log = daemon.log_path.read_text()
        assert "Server Shut Down." in log
        assert "Traceback" not in log and "Unhandled" not in log
    finally:
        daemon.kill()


def test_daemon_that_cannot_bind_exits_1_naming_the_address(proxyproc, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(proxyproc.ProxyStartError) as failed:
            proxyproc.start_daemon(
                {"proxy_url": f"http://127.0.0.1:{port}"}, tmp_path / "daemon"
            )
    message = str(failed.value)
    assert "twistd exited with 1" in message
    assert f"cannot listen on 127.0.0.1:{port} (proxy_url)" in message
    assert not (tmp_path / "daemon" / "twistd.pid").exists()
    assert not (tmp_path / "daemon" / "ports.json").exists()


def test_daemon_with_a_bad_config_exits_1_before_daemonizing(proxyproc, tmp_path):
    with pytest.raises(proxyproc.ProxyStartError) as failed:
        proxyproc.start_daemon({"mode": "fast"}, tmp_path / "daemon")
    assert "twistd exited with 1" in str(failed.value)
    assert "network.mode: unknown value 'fast'" in str(failed.value)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_foreground_proxy_exits_0_on_signal(proxy, signum):
    """
    twistd alone would end "killed by signal"; the proxy exits 0.
    """
    proxy.process.send_signal(signum)
    assert proxy.process.wait(5) == 0
