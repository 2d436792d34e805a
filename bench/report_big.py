"""
C{codexproxy report} on a big audit log: wall time and peak RSS.

Writes a LINES-line audit log (default 1,000,000) in a temporary
directory, shaped like a busy proxy's: 70% allowed requests over 5,000
hosts, 30% blocked ones over 2,000 destinations (a few hot, a long tail,
some local targets and denied hosts), one malformed line in a thousand.
Then runs the report in a child process and prints its wall time and peak
resident set size (C{ru_maxrss} of the child).

    .venv/bin/python -m bench.report_big [LINES]
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

from codex_proxy import cli

CONFIG = """\
[network]
enabled = true
allowed_domains = ["**.allowed.example"]
denied_domains = ["**.denied.example"]
"""

_T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def _template(decision: str, reason: str, protocol: str, host: str, port: int) -> str:
    method = {"http": "GET", "https_connect": "CONNECT"}.get(protocol, "none")
    fields = {
        "event.name": "codex.network_proxy.policy_decision",
        "event.timestamp": "@",
        "network.policy.scope": "domain",
        "network.policy.decision": decision,
        "network.policy.source": "baseline_policy",
        "network.policy.reason": reason,
        "network.transport.protocol": protocol,
        "server.address": host,
        "server.port": port,
        "http.request.method": method,
        "client.address": "127.0.0.1:40000",
        "network.policy.override": False,
    }
    return json.dumps(fields, separators=(",", ":"))


def _templates(rng: random.Random) -> Tuple[List[str], List[str]]:
    protocols = ["https_connect", "http", "socks5_tcp"]
    allowed = [
        _template("allow", "allowed", rng.choice(protocols), f"h{n}.allowed.example", 443)
        for n in range(5000)
    ]
    blocked = []
    for n in range(2000):
        if n % 50 == 0:
            host, reason = f"10.0.{n // 256}.{n % 256}", "not_allowed_local"
        elif n % 37 == 0:
            host, reason = f"x{n}.denied.example", "denied"
        else:
            host, reason = f"svc{n}.blocked.example", "not_allowed"
        blocked.append(_template("deny", reason, rng.choice(protocols), host, 443))
    return allowed, blocked


def write_log(path: str, lines: int, seed: int = 19) -> None:
    """
    Write C{lines} audit lines to C{path}.
    """
    rng = random.Random(seed)
    allowed, blocked = _templates(rng)
    with open(path, "w") as f:
        batch = []
        for n in range(lines):
            if n % 1000 == 999:
                batch.append('{"event.timestamp": truncated\n')
                continue
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(_T0 + n // 12))
            if rng.random() < 0.7:
                line = allowed[rng.randrange(len(allowed))]
            else:
                # A few hot destinations and a long tail.
                line = blocked[min(int(rng.paretovariate(1.2)) - 1, len(blocked) - 1)
                               if rng.random() < 0.5 else rng.randrange(len(blocked))]
            batch.append(line.replace('"@"', f'"{stamp}.{n % 1000:03d}Z"') + "\n")
            if len(batch) >= 10000:
                f.write("".join(batch))
                batch = []
        f.write("".join(batch))


def _child(log: str, config: str) -> None:
    import argparse

    from codex_proxy.report import add_arguments, run_report

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = io.StringIO()
    run_report(parser.parse_args([log, "--config", config]), out, cli._judge)
    sys.stderr.write(out.getvalue())


def main(lines: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        log = os.path.join(directory, "audit.jsonl")
        config = os.path.join(directory, "config.toml")
        with open(config, "w") as f:
            f.write(CONFIG)
        started = time.monotonic()
        write_log(log, lines)
        size = os.path.getsize(log)
        print(f"wrote {lines} lines ({size / 2**20:.0f} MiB) in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        child = subprocess.run(
            [sys.executable, "-m", "bench.report_big", "--child", log, config],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.monotonic() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(child.stderr)
        print(f"report: {wall:.1f} s wall, peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], sys.argv[3])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
