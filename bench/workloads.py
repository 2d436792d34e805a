"""
One function per workload; each returns {metric: value} for one target.

Load clients run on core 1 (with the origin); proxies are pinned to core 0.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench.origin import Nginx
from bench.peers import Target

_HERE = Path(__file__).resolve().parent
CLIENT = ["taskset", "-c", "1"]
_CLK = 100  # USER_HZ


def build_loadgen(workdir: Path) -> str:
    out = workdir / "loadgen"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(_HERE / "loadgen.c")], check=True)
    return str(out)


def cpu_seconds(pid: Optional[int]) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _wrk(target: Target, nginx: Nginx, seconds: int, extra: List[str]) -> Dict[str, float]:
    if target.http_port is None:
        url = f"http://{nginx.authority}/tiny"
        script: List[str] = []
    else:
        lua = _HERE / "absolute.lua"
        url = f"http://127.0.0.1:{target.http_port}/"
        script = ["-s", str(lua)]
    env = {"BENCH_ORIGIN": nginx.authority}
    cpu0 = cpu_seconds(target.proxy_pid)
    out = subprocess.run(
        CLIENT + ["wrk", "-t1", "-c50", f"-d{seconds}s", "--latency", *script, *extra, url],
        capture_output=True, text=True, check=True, env={**env, "PATH": "/usr/bin:/bin"},
    ).stdout
    cpu = cpu_seconds(target.proxy_pid) - cpu0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"bench: {target.name} answered {errors.group(1)} non-2xx responses:\n{out}")

    def pct(p: str) -> float:
        m = re.search(rf"{p}%\s+([\d.]+)(us|ms|s)", out)
        scale = {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)]
        return float(m.group(1)) * scale

    result = {"rps": rps, "p50_us": pct("50"), "p99_us": pct("99")}
    if target.proxy_pid is not None and total:
        result["cpu_us_per_req"] = cpu / total * 1e6
    return result


def keepalive(target: Target, nginx: Nginx, seconds: int) -> Dict[str, float]:
    r = _wrk(target, nginx, seconds, [])
    return {f"keepalive_{k}": v for k, v in r.items()}


def close(target: Target, nginx: Nginx, seconds: int) -> Dict[str, float]:
    r = _wrk(target, nginx, seconds, ["-H", "Connection: close"])
    return {"close_rps": r["rps"]}


def _loadgen(target: Target, mode: str, port: int, authority: str, threads: int, seconds: int) -> dict:
    out = subprocess.run(
        CLIENT + [target.loadgen, mode, str(port), authority, "/tiny", str(threads), str(seconds)],
        capture_output=True, text=True, check=True,
    ).stdout
    result = json.loads(out)
    if result["errors"] and result["errors"] > result["cycles"] // 100:
        raise SystemExit(f"bench: {target.name} {mode}: {result}")
    return result


def tunnels(target: Target, nginx: Nginx, seconds: int) -> Dict[str, float]:
    """
    New connections per second: a CONNECT tunnel carrying one GET (direct: a
    new connection carrying one GET).
    """
    if target.http_port is None:
        r = _loadgen(target, "direct", nginx.port, nginx.authority, 8, seconds)
    else:
        r = _loadgen(target, "connect", target.http_port, nginx.authority, 8, seconds)
    return {"tunnels_per_s": r["per_second"]}


def socks_tunnels(target: Target, nginx: Nginx, seconds: int) -> Dict[str, float]:
    r = _loadgen(target, "socks", target.socks_port, nginx.authority, 8, seconds)
    return {"socks_tunnels_per_s": r["per_second"]}


def ttfb(target: Target, nginx: Nginx, seconds: int) -> Dict[str, float]:
    """
    Time to first byte of a GET on a new connection, one at a time.
    """
    if target.http_port is None:
        r = _loadgen(target, "direct", nginx.port, nginx.authority, 1, seconds)
    else:
        r = _loadgen(target, "http", target.http_port, nginx.authority, 1, seconds)
    return {"ttfb_p50_us": r["ttfb_p50_us"]}


def _curl_speed(args: List[str]) -> float:
    out = subprocess.run(
        CLIENT + ["curl", "-sS", "--noproxy", "", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", *args],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
    ).stdout.split()
    return float(out[0]) / 1e6


def throughput(target: Target, nginx: Nginx, mib: int) -> Dict[str, float]:
    """
    Bulk MB/s through a tunnel and forwarded. The client runs where every
    other workload runs it, on core 1 with nginx, with a proxy or without:
    the proxy is the only difference, on its own core. (Giving the direct
    client the proxy's idle core instead measures a different transfer: the
    client's receive copy moves to a second core, which no proxied run can
    have.) The file is warm in the page cache (L{Nginx} reads it once at
    start): the first transfer of the run, the direct one, used to pay for
    filling the cache and came out 3x slower than the proxy it is meant to
    bound.
    """
    url = f"http://{nginx.authority}/big"
    rng = ["-r", f"0-{(mib << 20) - 1}"]
    if target.http_port is None:
        speed = _curl_speed([*rng, url])
        return {"tunnel_MBps": speed, "forward_MBps": speed}
    proxy = f"http://127.0.0.1:{target.http_port}"
    return {
        "tunnel_MBps": _curl_speed(["-p", "-x", proxy, *rng, url]),
        "forward_MBps": _curl_speed(["-x", proxy, *rng, url]),
    }


def idle_tunnels(target: Target, nginx: Nginx, count: int) -> Dict[str, float]:
    """
    Proxy memory per idle CONNECT tunnel: open C{count}, measure RSS growth.
    """
    socks: List[socket.socket] = []
    before = rss_kib(target.proxy_pid)
    try:
        request = f"CONNECT {nginx.authority} HTTP/1.1\r\nHost: {nginx.authority}\r\n\r\n".encode()
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", target.http_port), timeout=10)
            s.sendall(request)
            socks.append(s)
        for s in socks:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    raise SystemExit(f"bench: {target.name} closed an idle tunnel")
                head += chunk
            if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
                raise SystemExit(f"bench: {target.name} refused a tunnel: {head[:80]!r}")
        after = rss_kib(target.proxy_pid)
    finally:
        for s in socks:
            s.close()
    return {"idle_tunnel_KiB": (after - before) / count}


def policy_scaling() -> Dict[str, float]:
    """
    Decision time with 100,000 patterns against 10 (in-process, no I/O),
    with port-agnostic patterns and with patterns naming ports (SPEC §3.1:
    every list holding C{host:port} entries and a C{*:PORT} denylist).
    """
    from codex_proxy.model import Protocol, ProxyRequest
    from codex_proxy.policy import Policy, decide

    def per_decision(n: int, ports: bool = False) -> float:
        if ports:
            patterns = [f"**.host{i}.example.com:{1 + i % 65535}" for i in range(n - 1)]
            policy = Policy.build(
                allowed=patterns + ["**.github.com:443"],
                denied=["*:22"] + [f"*:{port}" for port in range(1024, 1024 + min(n, 1000))],
            )
        else:
            patterns = [f"**.host{i}.example.com" for i in range(n - 1)] + ["**.github.com"]
            policy = Policy.build(allowed=patterns)
        requests = [ProxyRequest(Protocol.HTTP, f"api{i % 50}.github.com", 443, method="GET") for i in range(2000)]
        assert all(decide(policy, r).allowed for r in requests[:50])
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for r in requests:
                decide(policy, r)
            best = min(best, (time.perf_counter() - t0) / len(requests))
        return best * 1e6

    small, large = per_decision(10), per_decision(100_000)
    ported_small, ported_large = per_decision(10, ports=True), per_decision(100_000, ports=True)
    return {
        "decide_us_10_patterns": small,
        "decide_us_100k_patterns": large,
        "decide_ratio_100k_to_10": large / small,
        "decide_us_10_port_patterns": ported_small,
        "decide_us_100k_port_patterns": ported_large,
        "decide_ratio_100k_to_10_port_patterns": ported_large / ported_small,
    }
