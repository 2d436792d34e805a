"""
What the operations listener costs on the keep-alive hot path: proxy CPU
microseconds per request (user + system time of the proxy process, from
C{/proc/PID/stat}) with and without C{admin_url}: two proxies side by
side, the same wrk load through each in turn (alternating which goes
first), and the median of the paired ratios.

CPU time per request, unlike throughput, hardly moves when other work
shares the machine, so this runs where C{make bench} cannot.

    .venv/bin/python -m bench.admin_cost [ROUNDS] [SECONDS]   # default 10 3
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Tuple

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


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _start(workdir: Path, admin: bool) -> Tuple[subprocess.Popen[bytes], dict[str, str]]:
    workdir.mkdir()
    (workdir / "home").mkdir()
    config = workdir / "config.toml"
    config.write_text(CONFIG + ('admin_url = "127.0.0.1:0"\n' if admin else ""))
    ports = workdir / "ports.json"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(CODEX_HOME=str(workdir / "home"), PYTHONPATH=str(_HERE.parent))
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=",
         "--logfile", str(workdir / "log"), "codexproxy", "--config", str(config),
         "--ports-file", str(ports), "--audit-log", str(workdir / "audit.jsonl")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    os.sched_setaffinity(proc.pid, {0})
    end = time.monotonic() + 30
    while not ports.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"codexproxy did not start: {(workdir / 'log').read_text()}")
        time.sleep(0.05)
    return proc, json.loads(ports.read_text())


def _load(proxy: subprocess.Popen[bytes], ports: dict[str, str], nginx: Nginx, seconds: int) -> float:
    """
    One wrk run through C{proxy}: its CPU microseconds per request.
    """
    env = {**os.environ, "BENCH_ORIGIN": nginx.authority}
    wrk = ["taskset", "-c", "1", "wrk", "-t1", "-c20", f"-d{seconds}s",
           "-s", str(_HERE / "absolute.lua"), f"http://{ports['http']}"]  # fmt: skip
    before = _cpu_seconds(proxy.pid)
    done = subprocess.run(wrk, env=env, capture_output=True, text=True, check=True)
    used = _cpu_seconds(proxy.pid) - before
    found = re.search(r"(\d+) requests in", done.stdout)
    assert found is not None and "Non-2xx" not in done.stdout, done.stdout
    return used * 1e6 / int(found.group(1))


def main(rounds: int, seconds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        root.chmod(0o755)  # nginx workers run unprivileged
        (root / "nginx").mkdir()
        nginx = Nginx(root / "nginx")
        off, on = _start(root / "off", admin=False), _start(root / "on", admin=True)
        try:
            for proxy, ports in (off, on):  # warm up
                _load(proxy, ports, nginx, 1)
            ratios = []
            for n in range(rounds):
                # Alternate which goes first, so drift on the machine
                # weighs on both alike.
                first, second = (off, on) if n % 2 == 0 else (on, off)
                taken = {id(first): _load(*first, nginx, seconds)}
                taken[id(second)] = _load(*second, nginx, seconds)
                without, with_ = taken[id(off)], taken[id(on)]
                ratios.append(with_ / without)
                print(f"round {n}: off {without:.1f} us/request, on {with_:.1f} us/request")
            # The counters saw the traffic: the listener was on and fed.
            page = urllib.request.urlopen(f"http://{on[1]['admin']}/metrics").read()
            assert b'codexproxy_decisions_total{client="anonymous",decision="allow"' in page
        finally:
            for proxy, _ in (off, on):
                proxy.terminate()
                proxy.wait(15)
            nginx.stop()
    print(f"median of the paired ratios on/off: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10, int(sys.argv[2]) if len(sys.argv) > 2 else 3)
