"""
The benchmark: codex-proxy against no proxy, the floor (L{bench.floor}, a
bare Twisted forwarder) and, when installed, Squid/tinyproxy; optionally an
earlier checkout ("before"); kept-alive requests also through codex-proxy
writing an --audit-log ("audited"). Same machine, same run, interleaved
rounds (five; each runs every workload on every target in turn), medians
and ratios.

    make bench [QUICK=1] [PEERS="squid tinyproxy"] [BASELINE=DIR]
    .venv/bin/python -m bench [--quick] [--rounds N] [--peers squid,tinyproxy] [--baseline DIR]

The proxy under test is pinned to core 0; the origin (nginx) and the load
clients (wrk, bench/loadgen.c) to core 1. Full policy, audit events and DNS
pinning stay on: the proxy runs on a normal config with an allowlist and
writes its log (audit events included) to a file. Results are printed as a
table and written to bench/out/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from bench import mitm, origin, peers, workloads

OUT = Path(__file__).resolve().parent / "out"


Workload = Callable[["peers.Target", "origin.Nginx"], Dict[str, float]]


def workload_list(seconds: int, quick: bool) -> List[Tuple[str, Workload]]:
    """
    The workloads of a round, by name, in the order they run.
    """
    mib = 64 if quick else origin.BIG_MIB
    return [
        ("keep-alive", lambda t, n: workloads.keepalive(t, n, seconds)),
        ("new connections", lambda t, n: workloads.close(t, n, seconds)),
        ("CONNECT", lambda t, n: workloads.tunnels(t, n, seconds)),
        ("TTFB", lambda t, n: workloads.ttfb(t, n, max(1, seconds // 2))),
        ("bulk", lambda t, n: workloads.throughput(t, n, mib)),
        ("SOCKS5", lambda t, n: workloads.socks_tunnels(t, n, seconds) if t.socks_port is not None else {}),
    ]


def table(rows: Dict[str, Dict[str, float]], names: List[str]) -> str:
    """
    Medians per metric and target, with ratios against no proxy and Squid.
    """
    metrics = sorted({m for r in rows.values() for m in r})
    lines = []
    header = f"{'metric':32}" + "".join(f"{n:>14}" for n in names)
    refs = [r for r in ("direct", "before", "floor", "squid") if r in names]
    header += "".join(f"{'codex/' + r:>14}" for r in refs)
    lines.append(header)
    for metric in metrics:
        line = f"{metric:32}"
        for name in names:
            value = rows.get(name, {}).get(metric)
            line += f"{value:>14.1f}" if value is not None else f"{'-':>14}"
        codex = rows.get("codex", {}).get(metric)
        for ref in refs:
            base = rows.get(ref, {}).get(metric)
            ratio = f"{codex / base:.2f}" if codex is not None and base else "-"
            line += f"{ratio:>14}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (under 2 minutes)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=int, default=None)
    parser.add_argument("--peers", default="", help="comma list: squid,tinyproxy")
    parser.add_argument(
        "--baseline", type=Path, default=None, metavar="TREE",
        help="also measure the codex-proxy checkout in TREE (e.g. a git worktree of an"
        " earlier commit) as 'before', in the same interleaved rounds",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (2 if args.quick else 4)
    wanted = [p for p in args.peers.replace(" ", ",").split(",") if p]

    workdir = Path(tempfile.mkdtemp(prefix="codex-bench-"))
    loadgen = workloads.build_loadgen(workdir)
    started: List[Callable[[], None]] = []
    try:
        nginx = origin.Nginx(workdir)
        started.append(nginx.stop)
        targets = [peers.direct(nginx)]
        if args.baseline is not None:
            targets.append(peers.codex(workdir, nginx, "before", args.baseline))
            started.append(targets[-1].stop)
        targets.append(peers.codex(workdir, nginx))
        started.append(targets[-1].stop)
        # The same, writing every decision to an --audit-log file: kept-alive
        # requests only, the figure its cost is judged by.
        audited = peers.codex(workdir, nginx, "audited", args=["--audit-log", str(workdir / "audit.jsonl")])
        audited.workloads = ("keep-alive",)
        targets.append(audited)
        started.append(audited.stop)
        targets.append(peers.floor(workdir))
        started.append(targets[-1].stop)
        for name in wanted:
            target = peers.start_peer(name, workdir)
            if target is None:
                print(f"bench: {name} is not installed; skipped", file=sys.stderr)
                continue
            targets.append(target)
            started.append(target.stop)
        for t in targets:
            t.loadgen = loadgen
        samples: Dict[str, Dict[str, List[float]]] = {t.name: {} for t in targets}
        # Memory per idle tunnel first, while every proxy is fresh: after the
        # load, freed memory would be reused and hide the real cost.
        for target in targets:
            if target.proxy_pid is not None and target.workloads is None:
                for metric, value in workloads.idle_tunnels(target, nginx, 1000).items():
                    samples[target.name][metric] = [value]
        for r in range(rounds):
            # Each round starts one target later, so no target always takes
            # the same place: two checkouts with the same tunnel code, one
            # always measured right after no proxy, came out up to 15% apart.
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            # A workload runs on every target in turn before the next one, so
            # that the figures a ratio compares are taken seconds apart, not
            # minutes: this machine's speed drifts (in one run, every figure
            # of one target's round came out 40% slow, the rest as usual).
            for name, workload in workload_list(seconds, args.quick):
                print(f"round {r + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
                for target in order:
                    if target.workloads is not None and name not in target.workloads:
                        continue
                    for metric, value in workload(target, nginx).items():
                        samples[target.name].setdefault(metric, []).append(value)
        medians = {
            name: {m: statistics.median(v) for m, v in per.items()} for name, per in samples.items()
        }
        for name, per in medians.items():
            if name != "direct" and "ttfb_p50_us" in per:
                per["ttfb_added_us"] = per["ttfb_p50_us"] - medians["direct"]["ttfb_p50_us"]
        medians["codex"].update(workloads.policy_scaling())
        print("interception (MITM) figures", file=sys.stderr, flush=True)
        medians["codex"].update(mitm.measure(10 if args.quick else 40, 500 if args.quick else 2000))
        names = [t.name for t in targets]
        # codex-proxy, the floor and "before" all run on this interpreter.
        interpreter = f"{os.path.realpath(sys.executable)} (Python {platform.python_version()}, {platform.python_build()[1]})"
        print(f"interpreter: {interpreter}")
        print(table(medians, names))
        audit_ratio = medians["audited"]["keepalive_rps"] / medians["codex"]["keepalive_rps"]
        print(f"\n--audit-log (audited): kept-alive req/s {audit_ratio:.2f}x codex-proxy's without it")
        OUT.mkdir(exist_ok=True)
        (OUT / "results.json").write_text(
            json.dumps(
                {
                    "interpreter": interpreter,
                    "rounds": rounds,
                    "seconds": seconds,
                    "medians": medians,
                    "samples": samples,
                    "audit_log_keepalive_ratio": audit_ratio,
                },
                indent=1,
            )
        )
        print(f"\nwritten: {OUT / 'results.json'}", file=sys.stderr)
    finally:
        for stop in reversed(started):
            stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
