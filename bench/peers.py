"""
The things measured: no proxy, codex-proxy, and optional peers (Squid,
tinyproxy) from the OS packages, each a L{Target}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from bench.origin import Nginx, free_port, wait_port

VENV_BIN = Path(sys.executable).parent


@dataclass
class Target:
    name: str
    http_port: Optional[int] = None
    socks_port: Optional[int] = None
    proxy_pid: Optional[int] = None
    loadgen: str = ""
    stop: Callable[[], None] = field(default=lambda: None)
    #: The workloads it runs, by name (L{bench.__main__.workload_list}); None: all.
    workloads: Optional[Tuple[str, ...]] = None


def direct(nginx: Nginx) -> Target:
    return Target("direct")


def _pin(pid: int) -> None:
    os.sched_setaffinity(pid, {0})


def codex(
    workdir: Path,
    nginx: Nginx,
    name: str = "codex",
    tree: Optional[Path] = None,
    args: Sequence[str] = (),
    wrapper: Sequence[str] = (),
) -> Target:
    """
    twistd codexproxy on port 0 with a realistic policy: an allowlist (the
    origin's address exactly, plus developer hosts), audit events on.

    @param tree: another checkout of codex-proxy (an earlier commit) to run
        instead of the installed one, with this environment's interpreter
        and libraries: how C{--baseline} measures before and after in one run.
    @param args: more C{codexproxy} options (C{--audit-log PATH}).
    @param wrapper: a command that runs the proxy (valgrind): it is then
        given minutes to start and to stop, and one hash seed, so that what
        it counts repeats.
    """
    workdir = workdir / name
    workdir.mkdir()
    home = workdir / "codex-home"
    home.mkdir()
    config = workdir / "codex.toml"
    config.write_text(
        """
[network]
enabled = true
proxy_url = "http://127.0.0.1:0"
socks_url = "http://127.0.0.1:0"
allowed_domains = ["127.0.0.1", "**.github.com", "pypi.org", "files.pythonhosted.org",
                   "registry.npmjs.org", "crates.io", "**.githubusercontent.com"]
denied_domains = ["gist.github.com"]
"""
    )
    ports = workdir / "codex-ports.json"
    log = workdir / "codex.log"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["CODEX_HOME"] = str(home)
    slow = 600 if wrapper else 15
    if wrapper:
        env["PYTHONHASHSEED"] = "0"
    if tree is not None:
        # Ahead of the installed package on sys.path: its codex_proxy and its
        # twisted/plugins/codexproxy_plugin.py are the ones imported.
        env["PYTHONPATH"] = str(tree.resolve())
    proc = subprocess.Popen(
        [*wrapper, sys.executable, str(VENV_BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(log),
         "codexproxy", "--config", str(config), "--ports-file", str(ports), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    _pin(proc.pid)
    end = time.monotonic() + 2 * slow
    while not ports.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"bench: codex-proxy did not start:\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.05)
    addrs = json.loads(ports.read_text())

    def stop() -> None:
        proc.terminate()
        proc.wait(slow)

    socks = addrs.get("socks")
    return Target(
        name,
        http_port=int(addrs["http"].rsplit(":", 1)[1]),
        socks_port=int(socks.rsplit(":", 1)[1]) if socks else None,
        proxy_pid=proc.pid,
        stop=stop,
    )


def floor(workdir: Path) -> Target:
    """
    The floor row: L{bench.floor}, a bare Twisted forwarder with no policy,
    on the same interpreter and core as codex-proxy.
    """
    ports = workdir / "floor-ports.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", str(ports)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _pin(proc.pid)
    end = time.monotonic() + 30
    while not ports.exists() or not ports.read_text():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit("bench: the floor forwarder did not start")
        time.sleep(0.05)
    port = int(json.loads(ports.read_text())["http"].rsplit(":", 1)[1])
    return _peer("floor", proc, port)


def _squid(workdir: Path) -> Optional[Target]:
    squid = shutil.which("squid") or "/usr/sbin/squid"
    if not Path(squid).exists():
        return None
    port = free_port()
    conf = workdir / "squid.conf"
    conf.write_text(
        f"""
http_port 127.0.0.1:{port}
http_access allow all
cache deny all
cache_mem 8 MB
access_log none
cache_log {workdir}/squid-cache.log
pid_filename {workdir}/squid.pid
coredump_dir {workdir}
workers 1
max_filedescriptors 16384
"""
    )
    proc = subprocess.Popen([squid, "-N", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 30)
    _pin(proc.pid)
    return _peer("squid", proc, port)


def _tinyproxy(workdir: Path) -> Optional[Target]:
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not Path(binary).exists():
        return None
    port = free_port()
    conf = workdir / "tinyproxy.conf"
    conf.write_text(
        f"""
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 2000
Allow 127.0.0.1
LogLevel Critical
PidFile "{workdir}/tinyproxy.pid"
"""
    )
    proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 30)
    _pin(proc.pid)
    return _peer("tinyproxy", proc, port)


def _peer(name: str, proc: subprocess.Popen, port: int) -> Target:
    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

    return Target(name, http_port=port, proxy_pid=proc.pid, stop=stop)


def start_peer(name: str, workdir: Path) -> Optional[Target]:
    starters = {"squid": _squid, "tinyproxy": _tinyproxy}
    if name not in starters:
        raise SystemExit(f"bench: unknown peer {name!r} (known: {', '.join(starters)})")
    return starters[name](workdir)
