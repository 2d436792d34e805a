"""
Proxy CPU time per unit of work: robust to a shared machine where wall-clock
rates are noise. Starts nginx and codex-proxy (as L{bench.peers.codex}
does), drives each workload and reads the proxy's user+system time from
C{/proc/PID/stat} around it.

    .venv/bin/python -m bench.cpu_per_request [--audit-log] [--tree DIR]
        [--seconds 5] [--only keepalive,connect,close,tunnel] [--py-spy keepalive]

The clients run on core 1 and the proxy on core 0, as in C{make bench}.
Reports CPU µs per keep-alive request (wrk, 50 connections), per new CONNECT
carrying one GET (bench/loadgen.c C{connect}), per GET on a new connection
one at a time with its TTFB (C{close}, not run by default), and per MB
through a CONNECT tunnel (curl -p) with its MB/s. C{--py-spy WORKLOAD} samples the proxy
during that workload and prints the top self-time shares.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from bench import origin, peers, workloads


def _cpu(target: peers.Target, work: Callable[[], Dict[str, float]]) -> tuple[Dict[str, float], float]:
    before = workloads.cpu_seconds(target.proxy_pid)
    result = work()
    return result, workloads.cpu_seconds(target.proxy_pid) - before


def keepalive(target: peers.Target, nginx: origin.Nginx, seconds: int, loadgen: str) -> Dict[str, float]:
    out = subprocess.run(
        workloads.CLIENT + ["wrk", "-t1", "-c50", f"-d{seconds}s", "-s", str(Path(workloads.__file__).parent / "absolute.lua"),
         f"http://127.0.0.1:{target.http_port}/"],
        capture_output=True, text=True, check=True, env={"BENCH_ORIGIN": nginx.authority, "PATH": "/usr/bin:/bin"},
    ).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"keepalive: errors\n{out}")
    return {"requests": int(re.search(r"(\d+) requests in", out).group(1))}


def connect(target: peers.Target, nginx: origin.Nginx, seconds: int, loadgen: str) -> Dict[str, float]:
    r = subprocess.run(
        workloads.CLIENT + [loadgen, "connect", str(target.http_port), nginx.authority, "/tiny", "4", str(seconds)],
        capture_output=True, text=True, check=True,
    ).stdout
    m = re.search(r'"cycles": (\d+), "errors": (\d+)', r)
    return {"requests": int(m.group(1)), "errors": int(m.group(2))}


def close(target: peers.Target, nginx: origin.Nginx, seconds: int, loadgen: str) -> Dict[str, float]:
    """
    One GET per new connection, one client at a time (bench/loadgen.c
    C{http}), as the TTFB figure of C{make bench} measures it.
    """
    r = subprocess.run(
        workloads.CLIENT + [loadgen, "http", str(target.http_port), nginx.authority, "/tiny", "1", str(seconds)],
        capture_output=True, text=True, check=True,
    ).stdout
    m = re.search(r'"cycles": (\d+), "errors": (\d+).*"ttfb_p50_us": (\d+)', r)
    return {"requests": int(m.group(1)), "errors": int(m.group(2)), "ttfb_p50_us": int(m.group(3))}


def tunnel(target: peers.Target, nginx: origin.Nginx, seconds: int, loadgen: str) -> Dict[str, float]:
    mib, rounds = origin.BIG_MIB, 4
    speeds = []
    for _ in range(rounds):
        out = subprocess.run(
            workloads.CLIENT + ["curl", "-sS", "--noproxy", "", "-o", "/dev/null", "-w", "%{speed_download}", "-p",
             "-x", f"http://127.0.0.1:{target.http_port}", "-r", f"0-{(mib << 20) - 1}",
             f"http://{nginx.authority}/big"],
            capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
        ).stdout
        speeds.append(float(out) / 1e6)
    return {"requests": rounds * mib * 1.048576, "MBps": max(speeds)}


WORKLOADS = {"keepalive": keepalive, "connect": connect, "close": close, "tunnel": tunnel}
UNITS = {"keepalive": "request", "connect": "CONNECT", "close": "new-connection GET", "tunnel": "MB"}


def top_self(raw: Path, count: int = 20) -> List[str]:
    """
    The functions with the largest shares of samples, from py-spy's raw
    (collapsed) output: self (at the top of the stack) and inclusive.
    """
    own: Dict[str, int] = collections.Counter()
    inclusive: Dict[str, int] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        own[frames[-1]] += int(n)
        for frame in set(frames):
            inclusive[frame] += int(n)
        total += int(n)
    lines = ["self:"] + [f"{n / total:6.1%}  {f}" for f, n in own.most_common(count)]
    lines += ["inclusive (codex_proxy):"] + [
        f"{n / total:6.1%}  {f}" for f, n in inclusive.most_common() if "codex_proxy/" in f
    ][:count]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_per_request", description=__doc__.split("\n\n")[0])
    parser.add_argument("--audit-log", action="store_true", help="run the proxy with --audit-log")
    parser.add_argument("--tree", type=Path, default=None, help="run the codex-proxy checkout in DIR")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--only", default="keepalive,connect,tunnel")
    parser.add_argument("--log-tail", type=int, default=0, metavar="N", help="print the proxy log's last N lines")
    parser.add_argument("--py-spy", default=None, metavar="WORKLOAD", help="profile this workload")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="codex-cpu-") as tmp:
        work = Path(tmp)
        nginx = origin.Nginx(work)
        extra = ["--audit-log", str(work / "audit.jsonl")] if args.audit_log else []
        target = peers.codex(work, nginx, tree=args.tree, args=extra)
        loadgen = workloads.build_loadgen(work)
        try:
            for name in args.only.split(","):
                spy = None
                if args.py_spy == name:
                    raw = work / "profile.txt"
                    spy = subprocess.Popen(
                        [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(target.proxy_pid),
                         "-r", "500", "-f", "raw", "-o", str(raw), "-d", str(args.seconds + 2)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                result, cpu = _cpu(target, lambda: WORKLOADS[name](target, nginx, args.seconds, loadgen))
                line = f"{name:10} {cpu / result['requests'] * 1e6:8.1f} CPU us per {UNITS[name]}"
                line += "".join(f"  {k}={v:.1f}" for k, v in result.items())
                print(line, flush=True)
                if spy is not None:
                    spy.wait()
                    print("\n".join(top_self(raw)))
        finally:
            target.stop()
            nginx.stop()
            if args.log_tail:
                print("".join((work / "codex" / "codex.log").read_text().splitlines(True)[-args.log_tail:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
