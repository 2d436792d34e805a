"""
Secrets the sandbox never sees (SPEC §12), through a real C{twistd
codexproxy}: curl and Python C{requests}, configured only by the output of
C{codexproxy env --ports-file}, send the placeholder; the TLS origin
standing in for the secret's host (pinned with C{--resolve}, trusted by the
proxy through C{SSL_CERT_FILE}) receives the real value, and no other
output of the run ever shows it.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support.gitbackend import GitHandler

BOUND, OTHER = "api.secret.test", "other.secret.test"
REPO = Path(__file__).resolve().parents[2]
PLACEHOLDER = re.compile(r"codexproxy-secret-API_KEY-[0-9a-f]{32}")
_REQUESTS = (
    "import os, sys, requests\n"
    "r = requests.get(sys.argv[1], headers={'Authorization': 'Bearer ' + os.environ['API_KEY']}, timeout=30)\n"
    "print(r.status_code, r.headers.get('x-proxy-error'), r.text)\n"
)


def _value() -> str:
    return "sk-e2e-" + os.urandom(12).hex()


def _start(
    proxy_factory: Any, tmp_path: Path, tls: Any, value: str, bound_ip: str = "127.0.0.1", **network: Any
) -> tuple[Any, Path, Path]:
    """
    A proxy whose secret C{API_KEY} (from a 0600 file) may go to L{BOUND}
    (which it resolves to C{bound_ip}); returns it, its audit log and the
    secret's file.
    """
    key = tmp_path / "api-key"
    key.write_text(value + "\n")
    os.chmod(key, 0o600)
    audit = tmp_path / "audit.jsonl"
    config = {
        "allowed_domains": [BOUND, OTHER, "127.0.0.1", "localhost"],
        "allow_local_binding": True,
        "secrets": {"API_KEY": {"source": f"file:{key}", "hosts": [BOUND]}},
        **network,
    }
    args = ("--resolve", f"{BOUND}={bound_ip}", "--resolve", f"{OTHER}=127.0.0.1", "--audit-log", str(audit))
    proxy = proxy_factory(config, args=args, env={"SSL_CERT_FILE": str(tls.cert)})
    return proxy, audit, key


def _cli(proxy: Any, *argv: str) -> subprocess.CompletedProcess[str]:
    from support import proxyproc

    return subprocess.run(
        [sys.executable, "-m", "codex_proxy.cli", *argv],
        capture_output=True,
        text=True,
        env=proxyproc.clean_env(CODEX_HOME=str(proxy.codex_home), PYTHONPATH=str(REPO)),
        timeout=60,
    )


def _child_env(proxy: Any) -> tuple[dict[str, str], str]:
    """
    The environment a sandboxed child gets: ours without proxy variables,
    plus what C{codexproxy env --ports-file} prints; and that output.
    """
    from support import proxyproc

    done = _cli(
        proxy, "env", "--config", str(proxy.config_path), "--ports-file", str(proxy.ports_path), "--shell", "json"
    )
    assert done.returncode == 0, done.stderr
    return {**proxyproc.clean_env(), **json.loads(done.stdout)}, done.stdout + done.stderr


def _curl(env: dict[str, str], url: str, *args: str) -> tuple[int, str]:
    """
    curl configured by C{env} alone: the last status and everything it printed.
    """
    done = subprocess.run(
        ["curl", "-q", "-sS", "--max-time", "30", "-D", "-", *args, url],
        capture_output=True,
        env=env,
        timeout=60,
    )
    out = done.stdout.decode("latin-1") + done.stderr.decode("latin-1")
    statuses = re.findall(r"^HTTP/\S+ (\d+)", out, re.M)
    return (int(statuses[-1]) if statuses else 0), out


def _requests(env: dict[str, str], url: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", _REQUESTS, url], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[0]), done.stdout + done.stderr


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def _opaque_get(proxy: Any, host: str, port: int, tls: Any, authorization: str) -> tuple[bytes, bytes]:
    """
    CONNECT by hand, TLS trusting only the origin's own certificate: the
    certificate the client saw (DER) and the response head.
    """
    from support import proxyproc

    with socket.create_connection(proxy.http_addr, timeout=30) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head, _ = proxyproc.read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context(cafile=str(tls.cert))
        with context.wrap_socket(sock, server_hostname=host) as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
            tls_sock.sendall(
                f"GET /opaque HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {authorization}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            response, _ = proxyproc.read_head(tls_sock)
    assert der is not None
    return der, response


def test_full_mode_the_bound_origin_alone_receives_the_value(
    proxy_factory, tmp_path, named_tls_files, named_tls_origins, origin
):
    """
    Full mode: curl (Bearer, Basic) and requests reach the bound origin with
    the real value; a placeholder in plain http:// or to another host is 403
    C{blocked-by-secret-policy} and reaches nobody; a tunnel to a host
    without secrets stays opaque (the origin's own certificate, the
    placeholder as sent); and no output of the run shows the value.
    """
    bound, other = named_tls_origins
    value = _value()
    proxy, audit, _ = _start(proxy_factory, tmp_path, named_tls_files, value)
    env, env_output = _child_env(proxy)
    placeholder = env["API_KEY"]
    assert PLACEHOLDER.fullmatch(placeholder)
    assert json.loads(proxy.ports_path.read_text())["placeholders"] == {"API_KEY": placeholder}
    outputs = [env_output, proxy.ports_path.read_text()]

    base = f"https://{BOUND}:{bound.port}"
    replies = [
        _curl(env, f"{base}/v1/models", "-H", f"Authorization: Bearer {placeholder}"),
        _requests(env, f"{base}/v1/chat"),
        _curl(env, f"{base}/repo.git/info/refs", "-u", f"x-access-token:{placeholder}"),
    ]
    assert [status for status, _ in replies] == [200, 200, 200], replies
    assert [seen.header("Authorization") for seen in bound.requests] == [
        f"Bearer {value}",
        f"Bearer {value}",
        _basic(f"x-access-token:{value}"),
    ]

    misused = [
        _curl(env, f"http://{OTHER}:{origin.port}/", "-H", f"x-api-key: {placeholder}"),
        _curl(env, f"http://{BOUND}:{origin.port}/", "-H", f"Authorization: Bearer {placeholder}"),
    ]
    for status, out in misused:
        assert status == 403, out
        assert "x-proxy-error: blocked-by-secret-policy" in out
        assert '"secret":"API_KEY"' in out
    assert origin.requests == []

    der, response = _opaque_get(proxy, OTHER, other.port, named_tls_files, f"Bearer {placeholder}")
    ours = x509.load_pem_x509_certificate(named_tls_files.cert.read_bytes()).public_bytes(Encoding.DER)
    assert der == ours
    assert response.startswith(b"HTTP/1.1 200")
    assert [seen.header("Authorization") for seen in other.requests] == [f"Bearer {placeholder}"]

    checked = _cli(proxy, "check-config", str(proxy.config_path))
    explained = _cli(proxy, "explain", "--config", str(proxy.config_path), f"{base}/")
    assert checked.returncode == 0, checked.stderr
    assert f"API_KEY  from file:{tmp_path / 'api-key'}  to {BOUND}" in checked.stdout
    proxy.stop()  # flushes the audit log
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["network.policy.secret"] for e in events if "network.policy.secret" in e] == ["API_KEY", "API_KEY"]

    outputs += [out for _, out in replies + misused]
    outputs += [response.decode("latin-1"), checked.stdout + checked.stderr]
    outputs += [explained.stdout + explained.stderr, proxy.output, audit.read_text()]
    assert all(value not in output for output in outputs)
    assert all(value not in str(seen) for seen in other.requests + origin.requests)


def test_limited_mode_without_mitm_injects_and_rotates_on_sighup(
    proxy_factory, tmp_path, named_tls_files, named_tls_origins
):
    """
    Limited mode with C{mitm = false}: tunnels to the secret's host are
    intercepted anyway and reads carry the value; after SIGHUP the rotated
    value goes out under the same placeholder.
    """
    bound, _ = named_tls_origins
    value = _value()
    proxy, _, key = _start(proxy_factory, tmp_path, named_tls_files, value, mode="limited")
    env, _ = _child_env(proxy)
    placeholder = env["API_KEY"]
    url = f"https://{BOUND}:{bound.port}/v1/models"

    assert _curl(env, url, "-H", f"Authorization: Bearer {placeholder}")[0] == 200
    assert _requests(env, url)[0] == 200
    rotated = _value()
    key.write_text(rotated + "\n")
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_line("policy reloaded")
    assert _curl(env, url, "-H", f"Authorization: Bearer {placeholder}")[0] == 200

    assert _child_env(proxy)[0]["API_KEY"] == placeholder
    assert [seen.header("Authorization") for seen in bound.requests] == [
        f"Bearer {value}",
        f"Bearer {value}",
        f"Bearer {rotated}",
    ]
    assert value not in proxy.output and rotated not in proxy.output


def test_a_secret_added_on_sighup_reaches_new_children_through_the_ports_file(
    proxy_factory, tmp_path, named_tls_files, named_tls_origins
):
    from support import proxyproc

    bound, _ = named_tls_origins
    value, added = _value(), _value()
    proxy, _, key = _start(proxy_factory, tmp_path, named_tls_files, value)
    first_env, _ = _child_env(proxy)
    assert "ADDED" not in first_env
    added_key = tmp_path / "added-key"
    added_key.write_text(added + "\n")
    os.chmod(added_key, 0o600)
    proxy.config_path.write_text(
        proxyproc.render_config(
            {
                "allowed_domains": [BOUND, OTHER, "127.0.0.1", "localhost"],
                "allow_local_binding": True,
                "secrets": {
                    "API_KEY": {"source": f"file:{key}", "hosts": [BOUND]},
                    "ADDED": {"source": f"file:{added_key}", "hosts": [BOUND]},
                },
            }
        )
    )
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_line("ports file written", nth=2)

    env, printed = _child_env(proxy)
    assert PLACEHOLDER.fullmatch(env["API_KEY"]) and env["API_KEY"] == first_env["API_KEY"]
    assert env["ADDED"].startswith("codexproxy-secret-ADDED-")
    url = f"https://{BOUND}:{bound.port}/v1/models"
    assert _curl(env, url, "-H", f"Authorization: Bearer {env['ADDED']}")[0] == 200
    assert [seen.header("Authorization") for seen in bound.requests] == [f"Bearer {added}"]
    assert added not in printed and added not in proxy.output
    assert added not in proxy.ports_path.read_text()


#: An address of its own for an origin of L{BOUND} on the HTTPS port, the
#: one SOCKS5 port interception takes.
BOUND_443 = ("127.0.0.44", 443)


ADMIN_TOKEN = "e2e-admin-token-0123456789"


def _socks_tls(proxy: Any, bundle: str) -> ssl.SSLSocket:
    """
    A SOCKS5 CONNECT to L{BOUND}:443 by name, then TLS trusting C{bundle}.
    """
    from support.socksclient import socks_request

    sock, rep, _ = socks_request(proxy.socks_addr, 1, BOUND, 443)
    assert rep == 0
    return ssl.create_default_context(cafile=bundle).wrap_socket(sock, server_hostname=BOUND)


def _open_connections(proxy: Any) -> dict[str, float]:
    """
    C{codexproxy_connections_open} by listener, where not zero.
    """
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(
        f"http://{proxy.ports['admin']}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        text = response.read().decode()
    return {
        sample.labels["listener"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "codexproxy_connections_open" and sample.value
    }


def test_socks5_to_port_443_of_a_secret_host_is_intercepted_and_other_ports_stay_opaque(
    proxy_factory, tmp_path, named_tls_files, named_tls_origin_at
):
    origin_443 = named_tls_origin_at(BOUND_443)
    other_port = named_tls_origin_at((BOUND_443[0], 0))
    value = _value()
    proxy, audit, _ = _start(
        proxy_factory,
        tmp_path,
        named_tls_files,
        value,
        bound_ip=BOUND_443[0],
        enable_socks5=True,
        socks_url="127.0.0.1:0",
        admin_url="127.0.0.1:0",
        admin_token=ADMIN_TOKEN,
    )
    env, _ = _child_env(proxy)
    placeholder = env["API_KEY"]
    socks = ("--proxy", f"socks5h://{proxy.ports['socks']}")
    bearer = f"Authorization: Bearer {placeholder}"

    named = ("--proxy", f"socks5h://agent:pw@{proxy.ports['socks']}")
    status, out = _curl(env, f"https://{BOUND}/v1/models", *named, "-H", bearer)
    assert status == 200, out
    assert [seen.header("Authorization") for seen in origin_443.requests] == [f"Bearer {value}"]
    # While such a tunnel is open it is the SOCKS5 listener's connection,
    # though the HTTP listener's interception serves it.
    from support import proxyproc

    with _socks_tls(proxy, env["SSL_CERT_FILE"]) as tls:
        tls.sendall(f"GET /again HTTP/1.1\r\nHost: {BOUND}\r\n{bearer}\r\n\r\n".encode())
        head, _ = proxyproc.read_head(tls)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert _open_connections(proxy) == {"socks5": 1.0}
    assert origin_443.requests[-1].header("Authorization") == f"Bearer {value}"
    # Another port of the same host carries bytes nobody reads: opaque, the
    # origin's own certificate, the placeholder as sent.
    status, out = _curl(
        env,
        f"https://{BOUND}:{other_port.port}/v1/models",
        *socks,
        "--cacert",
        str(named_tls_files.cert),
        "-H",
        bearer,
    )
    assert status == 200, out
    assert [seen.header("Authorization") for seen in other_port.requests] == [f"Bearer {placeholder}"]
    proxy.stop()  # flushes the audit log
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    # The first tunnel's inner request is the RFC 1929 client's, as its
    # CONNECT was; the others named no client.
    assert [(e["network.transport.protocol"], e.get("client.identity")) for e in events] == [
        ("socks5_tcp", "agent"),
        ("https", "agent"),
        ("socks5_tcp", None),
        ("https", None),
        ("socks5_tcp", None),
    ]
    assert value not in proxy.output and value not in audit.read_text()


def test_limited_mode_with_mitm_refuses_the_placeholder_to_another_host(
    proxy_factory, tmp_path, named_tls_files, named_tls_origins
):
    """
    Inside an intercepted tunnel to a host the secret is not bound to, a
    placeholder is refused with 403 C{blocked-by-secret-policy}, through
    curl and requests, and that origin receives nothing.
    """
    _, other = named_tls_origins
    proxy, _, _ = _start(proxy_factory, tmp_path, named_tls_files, _value(), mode="limited", mitm=True)
    env, _ = _child_env(proxy)
    url = f"https://{OTHER}:{other.port}/v1/models"

    status, out = _curl(env, url, "-H", f"Authorization: Bearer {env['API_KEY']}")
    assert status == 403 and "x-proxy-error: blocked-by-secret-policy" in out, out
    assert _requests(env, url)[1].startswith("403 blocked-by-secret-policy")
    assert other.requests == []


def _git(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_git_clone_over_https_with_the_placeholder_token(proxy_factory, tmp_path, named_tls_files):
    """
    C{git clone https://x-access-token:<placeholder>@host/repo.git} works
    against a git http backend that accepts only the real token (Basic
    credentials, decoded, replaced and encoded again by the proxy).
    """
    from support import proxyproc

    value = _value()
    home = tmp_path / "git-home"
    home.mkdir()
    settings = {"HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
    git_env = {**proxyproc.clean_env(), **settings}
    source, root = tmp_path / "src", tmp_path / "root"
    root.mkdir()
    assert _git("init", "-q", str(source), env=git_env).returncode == 0
    (source / "README").write_text("cloned through the proxy\n")
    _git("add", "README", env=git_env, cwd=source)
    committed = _git("-c", "user.name=t", "-c", "user.email=t@t.test", "commit", "-qm", "one", env=git_env, cwd=source)
    assert committed.returncode == 0, committed.stderr
    assert _git("clone", "-q", "--bare", str(source), str(root / "repo.git"), env=git_env).returncode == 0

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(named_tls_files.cert, named_tls_files.key)

    class Backend(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def __init__(self) -> None:
            super().__init__(("127.0.0.1", 0), GitHandler)
            self.root = root
            self.expected = _basic(f"x-access-token:{value}")
            self.seen: list[str | None] = []

        def finish_request(self, request: Any, client_address: Any) -> None:
            with context.wrap_socket(request, server_side=True) as conn:
                super().finish_request(conn, client_address)

    backend = Backend()
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    try:
        proxy, _, _ = _start(proxy_factory, tmp_path, named_tls_files, value)
        env, _ = _child_env(proxy)
        url = f"https://x-access-token:{env['API_KEY']}@{BOUND}:{backend.server_address[1]}/repo.git"
        cloned = _git("clone", "-q", url, str(tmp_path / "clone"), env={**env, **settings})
    finally:
        backend.shutdown()
        backend.server_close()
    assert cloned.returncode == 0, cloned.stderr
    assert (tmp_path / "clone" / "README").read_text() == "cloned through the proxy\n"
    assert backend.expected in backend.seen
    assert value not in cloned.stdout + cloned.stderr + proxy.output
