"""
The origin of the benchmark: nginx on core 1, serving a tiny body and a
large file over plain HTTP.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

TINY = b"x" * 100
#: The large file, and what a full bulk measurement moves of it: about 0.6 s
#: at loopback speed. At 256 MiB a transfer lasted 0.15 s, and one
#: scheduler hiccup moved a sample by a quarter (no proxy alone gave 1,438
#: to 1,840 MB/s in one run); from 1 GiB on, samples agree within a few percent.
BIG_MIB = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listening on 127.0.0.1:{port}")


class Nginx:
    def __init__(self, workdir: Path) -> None:
        nginx = "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise SystemExit("bench: nginx is missing (make bench installs it)")
        # nginx workers run unprivileged: the tree must be world-readable.
        workdir.chmod(0o755)
        root = workdir / "www"
        root.mkdir(mode=0o755)
        (root / "tiny").write_bytes(TINY)
        with open(root / "big", "wb") as f:
            f.truncate(BIG_MIB << 20)
        self.port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  server {{ listen 127.0.0.1:{self.port} backlog=4096; root {root}; }}
}}
"""
        )
        self._proc = subprocess.Popen(
            ["taskset", "-c", "1", nginx, "-c", str(conf), "-p", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        # Fill the page cache with the big file now, or the first bulk
        # transfer measured (the direct one) pays for it alone.
        subprocess.run(
            ["curl", "-sS", "--noproxy", "", "-o", "/dev/null", f"http://{self.authority}/big"],
            check=True,
        )

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)
