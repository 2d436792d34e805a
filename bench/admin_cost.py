"""
What the operations listener costs on the keep-alive hot path, with and
without C{admin_url}, where C{make bench} cannot run (a shared machine):

  - C{cpu}: proxy CPU microseconds per request (user + system time of the
    proxy process, from C{/proc/PID/stat}): two proxies side by side, the
    same wrk load through each in turn (alternating which goes first), the
    median of the paired ratios. CPU time per request hardly moves when
    other work shares the machine; it is still noisy by a few percent.
  - C{instructions}: instructions per request of the proxy process under
    callgrind, from two runs of N1 and N2 keep-alive requests on one
    connection (start-up and shut-down cancel out). Exact to a fraction of
    a percent, whatever else runs; takes some minutes.

    .venv/bin/python -m bench.admin_cost cpu [ROUNDS] [SECONDS]      # default 10 3
    .venv/bin/python -m bench.admin_cost instructions [N1] [N2]      # default 500 2500
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Sequence, Tuple

from bench.instructions import keepalive
from bench.origin import Nginx

_HERE = Path(__file__).resolve().parent
_TICK = os.sysconf("SC_CLK_TCK")

CONFIG = """\
[network]
enabled = true
proxy_url = "http://127.0.0.1:0"
enable_socks5 = false
allowed_domains = ["127.0.0.1", "**.github.com", "pypi.org", "files.pythonhosted.org"]
denied_domains = ["gist.github.com"]
"""

Proxy = Tuple["subprocess.Popen[bytes]", dict]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _start(workdir: Path, admin: bool, wrapper: Sequence[str] = (), wait: float = 30) -> Proxy:
    """
    A proxy with an audit log, and C{admin_url} when C{admin}; C{wrapper}
    runs it (valgrind).
    """
    workdir.mkdir()
    (workdir / "home").mkdir()
    config = workdir / "config.toml"
    config.write_text(CONFIG + ('admin_url = "127.0.0.1:0"\n' if admin else ""))
    ports = workdir / "ports.json"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    # One hash seed: set and dict layouts, so instruction counts, repeat.
    env.update(CODEX_HOME=str(workdir / "home"), PYTHONPATH=str(_HERE.parent), PYTHONHASHSEED="0")
    proc = subprocess.Popen(
        [*wrapper, sys.executable, str(Path(sys.executable).with_name("twistd")), "-n",
         "--pidfile=", "--logfile", str(workdir / "log"), "codexproxy", "--config",
         str(config), "--ports-file", str(ports), "--audit-log", str(workdir / "audit.jsonl")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "stderr", "w"),
    )  # fmt: skip
    os.sched_setaffinity(proc.pid, {0})
    end = time.monotonic() + wait
    while not ports.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"codexproxy did not start: {(workdir / 'stderr').read_text()}")
        time.sleep(0.05)
    return proc, json.loads(ports.read_text())


def _stop(proxy: Proxy) -> None:
    proxy[0].send_signal(signal.SIGTERM)
    proxy[0].wait(600)


def _load(proxy: Proxy, nginx: Nginx, seconds: int) -> float:
    """
    One wrk run through C{proxy}: its CPU microseconds per request.
    """
    env = {**os.environ, "BENCH_ORIGIN": nginx.authority}
    wrk = ["taskset", "-c", "1", "wrk", "-t1", "-c20", f"-d{seconds}s",
           "-s", str(_HERE / "absolute.lua"), f"http://{proxy[1]['http']}"]  # fmt: skip
    before = _cpu_seconds(proxy[0].pid)
    done = subprocess.run(wrk, env=env, capture_output=True, text=True, check=True)
    used = _cpu_seconds(proxy[0].pid) - before
    found = re.search(r"(\d+) requests in", done.stdout)
    assert found is not None and "Non-2xx" not in done.stdout, done.stdout
    return used * 1e6 / int(found.group(1))


def cpu(root: Path, nginx: Nginx, rounds: int = 10, seconds: int = 3) -> float:
    off, on = _start(root / "off", admin=False), _start(root / "on", admin=True)
    try:
        for proxy in (off, on):  # warm up
            _load(proxy, nginx, 1)
        ratios = []
        for n in range(rounds):
            first, second = (off, on) if n % 2 == 0 else (on, off)
            taken = {id(first): _load(first, nginx, seconds)}
            taken[id(second)] = _load(second, nginx, seconds)
            without, with_ = taken[id(off)], taken[id(on)]
            ratios.append(with_ / without)
            print(f"round {n}: off {without:.1f} us/request, on {with_:.1f} us/request")
        _fed(on)
    finally:
        _stop(off)
        _stop(on)
    return statistics.median(ratios)


def _fed(proxy: Proxy) -> None:
    """
    The counters saw the traffic: the listener was on and fed.
    """
    page = urllib.request.urlopen(f"http://{proxy[1]['admin']}/metrics").read()
    assert b'codexproxy_decisions_total{client="anonymous",decision="allow"' in page


def _requests(proxy: Proxy, nginx: Nginx, n: int) -> None:
    """
    C{n} keep-alive requests for the tiny body, one after the other.
    """
    keepalive(int(proxy[1]["http"].rsplit(":", 1)[1]), nginx.authority, n)


def instructions(root: Path, nginx: Nginx, n1: int = 500, n2: int = 2500) -> float:
    per = {}
    for admin in (False, True):
        counted = []
        for n in (n1, n2):
            out = root / f"{admin}-{n}.callgrind"
            wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            proxy = _start(root / f"{admin}-{n}", admin, wrapper, wait=600)
            _requests(proxy, nginx, n)
            if admin:
                _fed(proxy)
            _stop(proxy)
            stderr = (root / f"{admin}-{n}" / "stderr").read_text()
            counted.append(int(re.findall(r"Collected : (\d+)", stderr)[-1]))
        per[admin] = (counted[1] - counted[0]) / (n2 - n1)
        print(f"admin_url {'on' if admin else 'off'}: {per[admin]:.0f} instructions/request")
    return per[True] / per[False]


_MODES: dict[str, Callable[..., float]] = {"cpu": cpu, "instructions": instructions}


def main(mode: str, arguments: Sequence[str]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        root.chmod(0o755)  # nginx workers run unprivileged
        (root / "nginx").mkdir()
        nginx = Nginx(root / "nginx")
        try:
            ratio = _MODES[mode](root, nginx, *map(int, arguments))
        finally:
            nginx.stop()
    print(f"{mode}: on/off {ratio:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu", sys.argv[2:])
