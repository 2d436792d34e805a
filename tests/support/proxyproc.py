"""
Start a real C{twistd codexproxy} process and drive tunnels through it.

Shared by the end-to-end fixtures and C{bench/rss_tunnel.py} (which loads this
file by path), so there is exactly one copy of the start-up and
synchronisation logic: the child's output is drained by a thread, and callers
wait on that output (never on a sleep) for the C{ports file written} line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

#: The line the proxy logs once the ports file is in place.
READY_MARKER = "ports file written"

#: The legacy network table every test starts from (SPEC §2.2): loopback is
#: reachable only because it is listed exactly.
DEFAULT_NETWORK: dict[str, Any] = {
    "enabled": True,
    "proxy_url": "http://127.0.0.1:0",
    "enable_socks5": False,
    "allowed_domains": ["127.0.0.1", "localhost"],
    "denied_domains": [],
    "mode": "full",
}

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class ProxyStartError(RuntimeError):
    """
    The proxy exited, or never said it was ready, before the deadline.
    """


def self_signed_localhost(directory: Path, names: Sequence[str] = ()) -> tuple[Path, Path]:
    """
    Write a self-signed P-256 certificate for DNS C{localhost} (and
    C{names}) and IP 127.0.0.1 (usable as C{curl --cacert}) and its key
    into C{directory}; return their paths.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    *(x509.DNSName(name) for name in ("localhost", *names)),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def pattern_bytes(n: int) -> bytes:
    """
    The deterministic bytes the origins serve: 0..255 repeated, cut to C{n}.
    """
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


_REPO = Path(__file__).resolve().parents[2]


def twistd_path() -> str:
    """
    The C{twistd} of the running interpreter's environment.
    """
    return str(Path(sys.executable).with_name("twistd"))


def clean_env(**extra: str) -> dict[str, str]:
    """
    This process's environment without any proxy variables, so neither the
    proxy (SPEC §7) nor curl routes through something else.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy")
    }
    env.update(extra)
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(
            f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()
        ) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def render_config(network: Mapping[str, Any]) -> str:
    """
    A legacy C{[network]} config: L{DEFAULT_NETWORK} overridden by
    C{network}; a value of C{None} drops the key.
    """
    merged = {**DEFAULT_NETWORK, **network}
    lines = ["[network]"]
    lines += [
        f"{_toml_key(key)} = {_toml_value(value)}"
        for key, value in merged.items()
        if value is not None
    ]
    return "\n".join(lines) + "\n"


def proxy_command(config: Path, ports: Path, args: Sequence[str] = ()) -> list[str]:
    """
    The command line of one proxy (no pidfile, so parallel runs never clash),
    with C{args} added to the plugin's options.
    """
    return [
        twistd_path(),
        "-n",
        "--pidfile=",
        "codexproxy",
        "--config",
        str(config),
        "--ports-file",
        str(ports),
        *args,
    ]


def _write_config(config: str | Mapping[str, Any], workdir: Path) -> Path:
    text = config if isinstance(config, str) else render_config(config)
    path = workdir / "config.toml"
    path.write_text(text)
    return path


def _child_env(workdir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    # CODEX_HOME keeps remembered rules and CA files of the user out of it.
    home = workdir / "codex-home"
    home.mkdir(exist_ok=True)
    # PYTHONPATH: the checkout these tests belong to, whichever checkout the
    # virtualenv was installed from (worktrees share one venv). C{extra}
    # (e.g. HTTP_PROXY for chaining tests) goes on top of the clean env.
    return clean_env(
        CODEX_HOME=str(home), PYTHONUNBUFFERED="1", PYTHONPATH=str(_REPO), **(extra or {})
    )


def _parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class RunningProxy:
    """
    One proxy process and everything it has printed so far.

    @ivar ports: the parsed ports file.
    @ivar output_lines: stdout and stderr lines, appended by a reader thread.
    """

    process: subprocess.Popen[str]
    workdir: Path
    config_path: Path
    ports_path: Path
    ports: dict[str, str] = field(default_factory=dict)
    output_lines: list[str] = field(default_factory=list, repr=False)
    _changed: threading.Condition = field(
        default_factory=threading.Condition, repr=False
    )
    _eof: bool = field(default=False, repr=False)
    _reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def http_addr(self) -> tuple[str, int]:
        """
        The HTTP listener as C{(host, port)}.
        """
        return _parse_addr(self.ports["http"])

    @property
    def http_url(self) -> str:
        return "http://" + self.ports["http"]

    @property
    def socks_addr(self) -> tuple[str, int]:
        """
        The SOCKS5 listener as C{(host, port)}.
        """
        return _parse_addr(self.ports["socks"])

    @property
    def codex_home(self) -> Path:
        """
        The C{CODEX_HOME} of the process (its CA is under C{proxy/}).
        """
        return self.workdir / "codex-home"

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.output_lines)

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.output_lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def start_reader(self) -> None:
        self._reader = threading.Thread(
            target=self._drain, name=f"proxy-{self.pid}-output", daemon=True
        )
        self._reader.start()

    def wait_for_line(self, needle: str, timeout: float = 30.0, nth: int = 1) -> str:
        """
        Block until the C{nth} line containing C{needle} was printed; fail
        with the whole output if the process ends first or the deadline
        passes.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        found = 0
        with self._changed:
            while True:
                for line in self.output_lines[seen:]:
                    if needle in line:
                        found += 1
                        if found == nth:
                            return line
                seen = len(self.output_lines)
                if self._eof:
                    self.process.wait(timeout)
                    raise ProxyStartError(
                        f"proxy exited with {self.process.returncode} before"
                        f" logging {needle!r}:\n" + "\n".join(self.output_lines)
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProxyStartError(
                        f"proxy did not log {needle!r} within {timeout}s:\n"
                        + "\n".join(self.output_lines)
                    )
                self._changed.wait(remaining)

    def rss_bytes(self) -> int:
        """
        The process's resident set size, from C{/proc/PID/status}.
        """
        return read_rss(self.pid)

    def stop(self, timeout: float = 10.0) -> int:
        """
        SIGTERM, wait, then SIGKILL if it did not stop; returns the exit code.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return self.process.returncode


#: Sets the open-file limit to the soft and hard numbers of its first two
#: arguments, then becomes the command that follows, so the pid stays the
#: proxy's. (A C{preexec_fn} could deadlock: the test process runs threads.)
_NOFILE_LAUNCHER = r"""
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
os.execv(sys.argv[3], sys.argv[3:])
"""


def start_proxy(
    config: str | Mapping[str, Any],
    workdir: Path,
    timeout: float = 30.0,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    open_files: tuple[int, int] | None = None,
) -> RunningProxy:
    """
    Start a proxy with C{config} (TOML text, or a network table for
    L{render_config}) and extra options C{args} in C{workdir} and return
    once its ports file exists; C{env} adds variables to the proxy's
    (otherwise proxy-free) environment, C{open_files} sets its
    C{RLIMIT_NOFILE} to these C{(soft, hard)} numbers.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = _write_config(config, workdir)
    ports_path = workdir / "ports.json"
    command = proxy_command(config_path, ports_path, args)
    if open_files is not None:
        soft, hard = open_files
        command = [sys.executable, "-c", _NOFILE_LAUNCHER, str(soft), str(hard), *command]
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env=_child_env(workdir, env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    proxy = RunningProxy(process, workdir, config_path, ports_path)
    proxy.start_reader()
    try:
        proxy.wait_for_line(READY_MARKER, timeout)
        proxy.ports = json.loads(ports_path.read_text())
    except BaseException:
        proxy.stop()
        raise
    return proxy


#: Runs a command as a child subreaper (Linux): the daemon that C{twistd}
#: double-forks is re-parented to this launcher, which prints every exit
#: status it reaps ("exited PID STATUS"), so a test learns when and how the
#: daemon ended by reading lines, without polling.
_SUBREAPER_LAUNCHER = r"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER): " + os.strerror(ctypes.get_errno()))
print("spawned", os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ), flush=True)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    print("exited", pid, os.waitstatus_to_exitcode(status), flush=True)
"""


@dataclass
class DaemonProxy:
    """
    A daemonized proxy (C{twistd} without C{-n}) and the launcher that
    reaps it.

    @ivar launcher: the launcher process; its output holds the exit lines.
    @ivar pid: the daemon's pid, from its pid file.
    """

    launcher: RunningProxy
    pid: int
    pid_path: Path
    log_path: Path
    ports: dict[str, str]

    @property
    def http_addr(self) -> tuple[str, int]:
        return _parse_addr(self.ports["http"])

    def wait_exit(self, timeout: float) -> int:
        """
        The daemon's exit status, once it has exited (at most C{timeout}).
        """
        return int(self.launcher.wait_for_line(f"exited {self.pid} ", timeout).split()[2])

    def kill(self) -> None:
        """
        SIGKILL the daemon unless it already exited; reap the launcher.
        """
        if not any(line.startswith(f"exited {self.pid} ") for line in self.launcher.output_lines):
            os.kill(self.pid, signal.SIGKILL)
            self.wait_exit(10)
        self.launcher.stop()


def start_daemon(
    config: str | Mapping[str, Any], workdir: Path, timeout: float = 30.0
) -> DaemonProxy:
    """
    Start C{twistd --pidfile --logfile codexproxy} without C{-n}. It
    returns once the starting C{twistd} has exited 0, which it does only
    after the daemon bound its listeners and wrote its ports file (the
    proxy binds in C{privilegedStartService}), so no further wait is needed.

    @raise ProxyStartError: the starting C{twistd} exited non-zero.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = _write_config(config, workdir)
    ports_path, pid_path, log_path = (
        workdir / "ports.json", workdir / "twistd.pid", workdir / "twistd.log"
    )
    command = [
        twistd_path(), "--pidfile", str(pid_path), "--logfile", str(log_path),
        "codexproxy", "--config", str(config_path), "--ports-file", str(ports_path),
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", _SUBREAPER_LAUNCHER, *command],
        cwd=workdir,
        env=_child_env(workdir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    launcher = RunningProxy(process, workdir, config_path, ports_path)
    launcher.start_reader()
    parent = launcher.wait_for_line("spawned ", timeout).split()[1]
    status = int(launcher.wait_for_line(f"exited {parent} ", timeout).split()[2])
    if status != 0:
        launcher.stop()
        raise ProxyStartError(
            f"twistd exited with {status}:\n{launcher.output}"
            + (f"\nlog:\n{log_path.read_text()}" if log_path.exists() else "")
        )
    return DaemonProxy(
        launcher,
        int(pid_path.read_text()),
        pid_path,
        log_path,
        json.loads(ports_path.read_text()),
    )


def run_to_exit(
    config: str | Mapping[str, Any], workdir: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """
    Run a proxy that is expected to exit by itself (a bad config); a proxy
    still running after C{timeout} is killed and raises C{TimeoutExpired}.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = _write_config(config, workdir)
    return subprocess.run(
        proxy_command(config_path, workdir / "ports.json"),
        cwd=workdir,
        env=_child_env(workdir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )


def read_rss(pid: int) -> int:
    """
    C{VmRSS} of C{pid} in bytes.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")


class StreamingOrigin:
    """
    A raw TCP server thread that sends C{total} bytes to the one connection
    it accepts and then closes it: the far end of a tunnel under test.
    """

    CHUNK = 1 << 20

    def __init__(self, total: int) -> None:
        self.total = total
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(60)
        self.port = self._listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._serve, name="streaming-origin", daemon=True
        )

    def __enter__(self) -> StreamingOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # shutdown() wakes an accept() still waiting; close() alone does not.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(60)

    def _serve(self) -> None:
        chunk = pattern_bytes(self.CHUNK)
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            try:
                remaining = self.total
                while remaining:
                    piece = chunk[: min(remaining, len(chunk))]
                    conn.sendall(piece)
                    remaining -= len(piece)
                conn.shutdown(socket.SHUT_WR)
            except OSError as error:
                self.errors.append(error)


class HoldingOrigin:
    """
    A raw TCP server thread that accepts connections and holds them open,
    echoing what it reads: the far end of many idle tunnels.
    """

    def __init__(self, backlog: int = 1024) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="holding-origin", daemon=True)

    def __enter__(self) -> HoldingOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(60)
        for conn in self.accepted:
            conn.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def read_head(sock: socket.socket, limit: int = 65536) -> tuple[bytes, bytes]:
    """
    Read an HTTP response head from C{sock}; returns (head, bytes after it).
    """
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > limit:
            raise ValueError(f"response head too long: {data[:200]!r}")
        piece = sock.recv(4096)
        if not piece:
            raise ConnectionError(f"closed during response head: {data!r}")
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def open_tunnel(
    proxy_addr: tuple[str, int],
    target: str,
    rcvbuf: int | None = None,
    timeout: float = 30.0,
) -> tuple[socket.socket, bytes]:
    """
    CONNECT to C{target} (C{host:port}) through the proxy; returns the socket
    and any tunnel bytes that arrived with the C{200}.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(proxy_addr)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head, rest = read_head(sock)
    status = head.split(b"\r\n", 1)[0]
    if status.split()[1:2] != [b"200"]:
        sock.close()
        raise ConnectionError(f"CONNECT {target} refused: {head!r}")
    return sock, rest


@dataclass
class StreamResult:
    """
    What a paced reader saw: bytes read, RSS samples (bytes), elapsed time.
    """

    received: int
    baseline_rss: int
    samples: list[int]
    seconds: float

    @property
    def peak_rss(self) -> int:
        return max([self.baseline_rss, *self.samples])

    @property
    def growth(self) -> int:
        return self.peak_rss - self.baseline_rss

    @property
    def mb_per_s(self) -> float:
        return self.received / 1e6 / self.seconds if self.seconds else 0.0


def read_stream(
    sock: socket.socket,
    already: int,
    recv_size: int,
    delay: float = 0.0,
    rss_pid: int | None = None,
    sample_every: int = 16 << 20,
) -> StreamResult:
    """
    Read C{sock} to EOF in C{recv_size} pieces, pausing C{delay} seconds
    after each, sampling the RSS of C{rss_pid} every C{sample_every} bytes.
    """
    baseline = read_rss(rss_pid) if rss_pid is not None else 0
    samples: list[int] = []
    received = already
    next_sample = sample_every
    started = time.monotonic()
    while True:
        piece = sock.recv(recv_size)
        if not piece:
            break
        received += len(piece)
        if rss_pid is not None and received >= next_sample:
            samples.append(read_rss(rss_pid))
            next_sample += sample_every
        if delay:
            time.sleep(delay)
    return StreamResult(received, baseline, samples, time.monotonic() - started)
