"""
Named clients (SPEC §11) on a real C{twistd codexproxy} process, with real
clients sending credentials as they always do: curl over HTTP and SOCKS5,
Python C{requests} and C{httpx}, and git cloning from a local
C{git http-backend}; tokens rotate on SIGHUP and never
appear in the log, the audit log or a reply.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import requests
from support.gitbackend import GitHandler

TOKEN_A = "alpha-token-0123456789"
TOKEN_B = "bravo-token-0123456789"
ROTATED = "rotated-token-987654321"


def _network(token_a: str = TOKEN_A, b_allows: tuple[str, ...] = ()) -> dict:
    return {
        "allowed_domains": ["127.0.0.1"],
        "enable_socks5": True,
        "socks_url": "127.0.0.1:0",
        "clients": {
            "agent-a": {"token": token_a, "allowed_domains": ["localhost"]},
            "agent-b": {"token": TOKEN_B, "allowed_domains": list(b_allows)},
        },
    }


def _start(proxy_factory, tmp_path):
    log = tmp_path / "audit.jsonl"
    proxy = proxy_factory(_network(), args=("--audit-log", str(log)))
    return proxy, log


def _url(proxy, name: str, token: str) -> str:
    host, port = proxy.http_addr
    return f"http://{name}:{token}@{host}:{port}"


def _no_token_anywhere(proxy, log, *replies) -> None:
    texts = [proxy.output, log.read_text() if log.exists() else ""]
    texts += [repr(reply) for reply in replies]
    for token in (TOKEN_A, TOKEN_B, ROTATED):
        for text in texts:
            assert token not in text


def test_curl_with_right_and_wrong_tokens(proxy_factory, origin, curl, tmp_path):
    proxy, log = _start(proxy_factory, tmp_path)
    good = curl.run(origin.url("/ok"), proxy=_url(proxy, "agent-a", TOKEN_A))
    wrong = curl.run(origin.url("/wrong"), proxy=_url(proxy, "agent-a", TOKEN_B))
    anonymous = curl.run(origin.url("/anon"), proxy=proxy.http_url)
    assert good.status == 200
    assert (wrong.status, anonymous.status) == (407, 407)
    assert wrong.headers["proxy-authenticate"] == 'Basic realm="codex-proxy"'
    assert wrong.headers["x-proxy-error"] == "proxy-auth-required"
    assert [seen.path for seen in origin.requests] == ["/ok"]
    assert origin.requests[0].header("Proxy-Authorization") is None
    proxy.stop()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["network.policy.reason"], e.get("client.identity")) for e in events] == [
        ("allowed", "agent-a"),
        ("client_auth_failed", None),
        ("client_auth_failed", None),
    ]
    _no_token_anywhere(proxy, log, good, wrong, anonymous)


def test_one_clients_extra_allow_is_its_own(proxy_factory, origin, curl, tmp_path):
    proxy, log = _start(proxy_factory, tmp_path)
    a = curl.run(origin.url("/a", host="localhost"), proxy=_url(proxy, "agent-a", TOKEN_A))
    b = curl.run(origin.url("/b", host="localhost"), proxy=_url(proxy, "agent-b", TOKEN_B))
    assert a.status == 200
    assert b.status == 403
    assert [seen.path for seen in origin.requests] == ["/a"]


def test_curl_socks5_with_proxy_user(proxy_factory, origin, curl, tmp_path):
    proxy, log = _start(proxy_factory, tmp_path)
    host, port = proxy.socks_addr
    good = curl.run(
        origin.url("/socks"), "--socks5-hostname", f"{host}:{port}", "--proxy-user", f"agent-a:{TOKEN_A}",
        proxy=None,
    )
    wrong = curl.run(
        origin.url("/nope"), "--socks5-hostname", f"{host}:{port}", "--proxy-user", f"agent-a:{TOKEN_B}",
        proxy=None,
    )
    assert good.status == 200
    assert wrong.status == 0 and wrong.returncode != 0
    assert [seen.path for seen in origin.requests] == ["/socks"]
    proxy.stop()
    _no_token_anywhere(proxy, log, good, wrong)


def test_requests_and_httpx_with_credentials_in_the_proxy_url(proxy_factory, origin, tmp_path):
    proxy, log = _start(proxy_factory, tmp_path)
    url = _url(proxy, "agent-b", TOKEN_B)
    with requests.Session() as session:
        session.trust_env = False
        assert session.get(origin.url("/requests"), proxies={"http": url}, timeout=30).status_code == 200
        assert session.get(origin.url("/x"), proxies={"http": _url(proxy, "agent-b", "x" * 20)}, timeout=30).status_code == 407
    with httpx.Client(proxy=url, trust_env=False, timeout=30) as client:
        assert client.get(origin.url("/httpx")).status_code == 200
    assert [seen.path for seen in origin.requests] == ["/requests", "/httpx"]
    assert all(seen.header("Proxy-Authorization") is None for seen in origin.requests)


class _GitOrigin(http.server.ThreadingHTTPServer):
    """
    A plain-HTTP git origin that wants no credentials and records the
    C{Proxy-Authorization} of every request that reaches it.
    """

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingGitHandler)
        self.root, self.expected = root, None
        self.seen: list[str | None] = []
        self.proxy_seen: list[str | None] = []


class _RecordingGitHandler(GitHandler):
    def _handle(self) -> None:
        self.server.proxy_seen.append(self.headers.get("Proxy-Authorization"))  # type: ignore[attr-defined]
        super()._handle()

    do_GET = do_POST = _handle


def test_git_clone_with_credentials_in_http_proxy(proxy_factory, tmp_path, proxyproc):
    proxy, log = _start(proxy_factory, tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = proxyproc.clean_env(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0")
    source, root = tmp_path / "src", tmp_path / "root"
    root.mkdir()

    def git(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *argv], env=env, capture_output=True, text=True, timeout=120, **kw)

    assert git("init", "-q", str(source)).returncode == 0
    (source / "README").write_text("cloned through the proxy\n")
    git("add", "README", cwd=source)
    assert git("-c", "user.name=t", "-c", "user.email=t@t.test", "commit", "-qm", "one", cwd=source).returncode == 0
    assert git("clone", "-q", "--bare", str(source), str(root / "repo.git")).returncode == 0
    origin = _GitOrigin(root)
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{origin.server_address[1]}/repo.git"
        cloned = git("-c", f"http.proxy={_url(proxy, 'agent-a', TOKEN_A)}", "clone", "-q", url, str(tmp_path / "clone"))
        refused = git("-c", f"http.proxy={_url(proxy, 'agent-a', TOKEN_B)}", "ls-remote", url)
    finally:
        origin.shutdown()
        origin.server_close()
    assert cloned.returncode == 0, cloned.stderr
    assert (tmp_path / "clone" / "README").read_text() == "cloned through the proxy\n"
    assert refused.returncode != 0 and "407" in refused.stderr
    assert origin.proxy_seen and set(origin.proxy_seen) == {None}
    proxy.stop()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert {e.get("client.identity") for e in events if e["network.policy.decision"] == "allow"} == {"agent-a"}
    _no_token_anywhere(proxy, log, cloned.stdout + cloned.stderr, refused.stdout + refused.stderr)


def test_sighup_rotates_a_token_and_reloads_overlays(proxy_factory, origin, curl, tmp_path, proxyproc):
    proxy, log = _start(proxy_factory, tmp_path)
    assert curl.run(origin.url("/before"), proxy=_url(proxy, "agent-a", TOKEN_A)).status == 200
    b_local = origin.url("/b-local", host="localhost")
    assert curl.run(b_local, proxy=_url(proxy, "agent-b", TOKEN_B)).status == 403
    proxy.config_path.write_text(proxyproc.render_config(_network(ROTATED, b_allows=("localhost",))))
    os.kill(proxy.pid, signal.SIGHUP)
    line = proxy.wait_for_line("policy reloaded")
    assert "clients changed: agent-a, agent-b" in line
    old = curl.run(origin.url("/old"), proxy=_url(proxy, "agent-a", TOKEN_A))
    new = curl.run(origin.url("/new"), proxy=_url(proxy, "agent-a", ROTATED))
    assert (old.status, new.status) == (407, 200)
    assert curl.run(b_local, proxy=_url(proxy, "agent-b", TOKEN_B)).status == 200
    assert [seen.path for seen in origin.requests] == ["/before", "/new", "/b-local"]
    proxy.stop()
    _no_token_anywhere(proxy, log, old, new)


def test_curl_https_through_connect_with_credentials(proxy_factory, tls_origin, tls_files, curl, tmp_path):
    proxy, log = _start(proxy_factory, tmp_path)
    url = tls_origin.url("/tls", host="localhost")
    good = curl.run(url, "--cacert", str(tls_files.cert), proxy=_url(proxy, "agent-a", TOKEN_A))
    # localhost is agent-a's extra allow only.
    other = curl.run(url, "--cacert", str(tls_files.cert), proxy=_url(proxy, "agent-b", TOKEN_B))
    assert (good.connect_status, good.status) == (200, 200), good.stderr
    assert other.connect_status == 403
    assert [seen.path for seen in tls_origin.requests] == ["/tls"]
    proxy.stop()
    _no_token_anywhere(proxy, log, good, other)
