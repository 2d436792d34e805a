"""
Instructions the proxy process executes per unit of work, counted by
callgrind: a kept-alive request, a CONNECT tunnel carrying one GET, or a
GET on a new connection. Rates and CPU times on a shared machine move by
a tenth from one run to the next; these counts repeat to about half a
percent, so a change worth one percent can be seen. They count user-space
instructions only: system calls saved are not in them.

Each checkout runs under C{valgrind --tool=callgrind} twice, for N1 and N2
units of work from one client, one after another (start-up, warm-up and
shut-down cancel out in the difference), with C{--busy-poll-us 0} where the
checkout has that option: the polls it spins through between one unit and
the next are counted by the wall clock, which callgrind slows, not work.

    .venv/bin/python -m bench.instructions [--workload keepalive|connect|close]
        [--counts N1,N2] [TREE ...]

Each TREE is a checkout of codex-proxy (a git worktree) run with this
environment's interpreter; none: the installed one.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from bench import peers
from bench.origin import Nginx

#: Units of work before counting starts: caches filled, code paths warm.
WARM = 20


def keepalive(port: int, authority: str, n: int) -> None:
    """
    C{n} requests for the tiny body, one after the other, on one connection.
    """
    request = f"GET http://{authority}/tiny HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(n):
            s.sendall(request)
            data = b""
            while not data.endswith(b"x" * 100):
                data += s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200"), data


def _read_to_eof(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def connect(port: int, authority: str, n: int) -> None:
    """
    C{n} CONNECT tunnels, each carrying one GET with C{Connection: close}.
    """
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
            assert head.startswith(b"HTTP/1.1 200"), head
            s.sendall(f"GET /tiny HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
            assert _read_to_eof(s).startswith(b"HTTP/1.1 200")


def close(port: int, authority: str, n: int) -> None:
    """
    C{n} GETs, each on a new connection, with C{Connection: close}.
    """
    request = f"GET http://{authority}/tiny HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(request.encode())
            assert _read_to_eof(s).startswith(b"HTTP/1.1 200")


WORKLOADS: Dict[str, Callable[[int, str, int], None]] = {
    "keepalive": keepalive,
    "connect": connect,
    "close": close,
}


def _counted(out: Path) -> int:
    """
    The instructions a callgrind output file counts in all.
    """
    found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(errors="replace"), re.MULTILINE)
    if found is None:
        raise SystemExit(f"bench: no count in {out}")
    return int(found.group(1))


def _no_spin(tree: Optional[Path]) -> List[str]:
    """
    The option that stops the proxy of C{tree} (none: the installed one)
    spinning between events, if it has it.
    """
    if tree is None:
        import codex_proxy.tap

        tap = Path(codex_proxy.tap.__file__)
    else:
        tap = tree / "codex_proxy" / "tap.py"
    return ["--busy-poll-us", "0"] if "busy-poll-us" in tap.read_text() else []


def per_unit(
    workdir: Path, nginx: Nginx, workload: str, counts: List[int], tree: Optional[Path], label: str
) -> float:
    """
    Instructions per unit of C{workload} for the checkout C{tree}; C{label}
    names its runs in C{workdir}.
    """
    work = WORKLOADS[workload]
    totals = []
    for n in counts:
        name = f"{label}-{n}"
        out = workdir / f"{name}.callgrind"
        target = peers.codex(
            workdir, nginx, name=name, tree=tree, args=_no_spin(tree),
            wrapper=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"],
        )  # fmt: skip
        try:
            assert target.http_port is not None
            work(target.http_port, nginx.authority, WARM)
            work(target.http_port, nginx.authority, n)
        finally:
            target.stop()
        totals.append(_counted(out))
    return (totals[1] - totals[0]) / (counts[1] - counts[0])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="keepalive")
    parser.add_argument("--counts", default=None, help="N1,N2 (default 200,1000; connect and close 100,400)")
    parser.add_argument("trees", nargs="*", type=Path)
    args = parser.parse_args(argv)
    default = "200,1000" if args.workload == "keepalive" else "100,400"
    counts = [int(n) for n in (args.counts or default).split(",")]
    with tempfile.TemporaryDirectory(prefix="codex-instructions-") as directory:
        root = Path(directory)
        root.chmod(0o755)  # nginx workers run unprivileged
        (root / "nginx").mkdir()
        (root / "runs").mkdir()
        nginx = Nginx(root / "nginx")
        try:
            for i, tree in enumerate(args.trees or [None]):
                n = per_unit(root / "runs", nginx, args.workload, counts, tree, f"tree{i}")
                print(f"{tree or 'installed'}: {n:,.0f} instructions per {args.workload} unit", flush=True)
        finally:
            nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
