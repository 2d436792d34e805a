"""
The operations listener (SPEC §13) of a real C{twistd codexproxy}: after
mixed traffic over HTTP, CONNECT and SOCKS5, its metrics agree with the
audit log, C{/blocked} lists the blocks newest first, C{/policy} holds no
token, and the proxy refuses to reach it on a client's behalf.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import urllib.error
import urllib.request
from typing import Any, Dict, List, Mapping, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.socksclient import socks_request

TOKEN = "e2e-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

OPERATIONS = {
    "enable_socks5": True,
    "socks_url": "127.0.0.1:0",
    "admin_url": "http://127.0.0.1:0",
    "admin_token": TOKEN,
    "denied_domains": ["denied.example"],
}


def admin(
    proxy: Any,
    path: str,
    method: str = "GET",
    headers: Mapping[str, str] = AUTH,
) -> Tuple[int, Dict[str, str], bytes]:
    """
    One request straight to the operations listener: status, headers
    (lower-case names), body.
    """
    request = urllib.request.Request(
        f"http://{proxy.ports['admin']}{path}", method=method, headers=dict(headers)
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, _lower(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, _lower(e.headers), e.read()


def _lower(headers: Any) -> Dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def scrape(proxy: Any) -> Dict[str, List[Tuple[Dict[str, str], float]]]:
    """
    C{/metrics} parsed by prometheus_client's own parser: sample name ->
    [(labels, value)].
    """
    status, headers, body = admin(proxy, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples: Dict[str, List[Tuple[Dict[str, str], float]]] = collections.defaultdict(list)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def value(samples: Mapping[str, List[Tuple[Dict[str, str], float]]], name: str, **labels: str) -> float:
    [found] = [v for l, v in samples[name] if all(l.get(k) == w for k, w in labels.items())]
    return found


def connect_tunnel(proxy: Any, port: int) -> socket.socket:
    """
    A CONNECT tunnel to 127.0.0.1:PORT through the HTTP listener, open.
    """
    sock = socket.create_connection(proxy.http_addr, timeout=30)
    sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        piece = sock.recv(4096)
        assert piece, head
        head += piece
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def test_metrics_agree_with_the_audit_log(proxy_factory, origin, curl, closed_port, tmp_path):
    log = tmp_path / "audit.jsonl"
    proxy = proxy_factory(OPERATIONS, args=("--audit-log", str(log)))
    assert set(proxy.ports) == {"http", "socks", "admin"}
    via, socks = proxy.http_url, f"socks5h://{proxy.ports['socks']}"
    results = [
        curl.run(origin.url("/a"), proxy=via),  # allowed
        curl.run("http://unlisted.example/", proxy=via),  # not_allowed
        curl.run("http://denied.example/", proxy=via),  # denied
        curl.run(f"http://127.0.0.1:{closed_port}/", proxy=via),  # allowed, then failed
        curl.run(origin.url("/b"), "--proxytunnel", proxy=via),  # CONNECT allowed
        curl.run("https://unlisted.example/", proxy=via),  # CONNECT not_allowed
        curl.run(origin.url("/c"), proxy=socks),  # SOCKS5 allowed
        curl.run("http://unlisted.example/", proxy=socks),  # SOCKS5 not_allowed
    ]
    assert [(r.status, r.connect_status) for r in results] == [
        (200, 0), (403, 0), (403, 0), (502, 0), (200, 200), (0, 403), (200, 0), (0, 0),
    ]  # fmt: skip
    tunnel = connect_tunnel(proxy, origin.port)
    sock, rep, _ = socks_request(proxy.socks_addr, 1, "unlisted.example", 80)
    sock.close()
    assert rep == 2

    samples = scrape(proxy)
    assert value(samples, "codexproxy_tunnels_open", listener="http") == 1
    assert value(samples, "codexproxy_connections_open", listener="http") >= 1
    tunnel.close()
    proxy.stop()

    events = [json.loads(line) for line in log.read_text().splitlines()]
    in_log = collections.Counter(
        (e["network.policy.decision"], e["network.policy.reason"]) for e in events
    )
    counted: Dict[Tuple[str, str], float] = collections.Counter()
    for labels, count in samples["codexproxy_decisions_total"]:
        counted[(labels["decision"], labels["reason"])] += count
    assert counted == in_log
    assert in_log == {
        ("allow", "allowed"): 5,
        ("deny", "not_allowed"): 4,
        ("deny", "denied"): 1,
    }
    protocols = {labels["protocol"] for labels, _ in samples["codexproxy_decisions_total"]}
    assert protocols == {"http", "https_connect", "socks5_tcp"}
    assert value(samples, "codexproxy_connections_total", listener="http", outcome="blocked") >= 3
    assert value(samples, "codexproxy_connections_total", listener="http", outcome="failed") == 1
    assert value(samples, "codexproxy_relayed_bytes_total", direction="down") > 0
    assert value(samples, "codexproxy_decision_seconds_count") == len(events)
    assert value(samples, "codexproxy_upstream_connect_seconds_count") == 5


def test_blocked_newest_first_and_health(proxy_factory, curl):
    proxy = proxy_factory(OPERATIONS)
    via = proxy.http_url
    for host in ("first.example", "second.example", "denied.example"):
        assert curl.run(f"http://{host}/", proxy=via).status == 403
    status, _, body = admin(proxy, "/blocked")
    assert status == 200
    blocked = json.loads(body)
    assert [(b["server.address"], b["network.policy.reason"]) for b in blocked] == [
        ("denied.example", "denied"),
        ("second.example", "not_allowed"),
        ("first.example", "not_allowed"),
    ]
    stamps = [b["event.timestamp"] for b in blocked]
    assert stamps == sorted(stamps, reverse=True)
    assert admin(proxy, "/healthz")[::2] == (200, b"ok\n")


def test_policy_shows_no_token(proxy_factory, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    proxy = proxy_factory(
        {**OPERATIONS, "admin_token": None, "admin_token_file": str(token_file)}
    )
    status, headers, body = admin(proxy, "/policy")
    assert (status, headers["content-type"]) == (200, "application/json")
    assert TOKEN not in body.decode()
    document = json.loads(body)
    # Whether a token is set is no secret, but every token-named value is
    # blanked all the same (admin.redact, the second fence).
    assert document["settings"]["admin_token"] == "(redacted)"
    assert document["settings"]["admin_url"] == "127.0.0.1:0"
    assert [d["pattern"] for d in document["denied_domains"]] == ["denied.example"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-the-token-0123456789"}, {"Authorization": TOKEN}],
)
def test_wrong_or_missing_token(proxy_factory, headers):
    proxy = proxy_factory(OPERATIONS)
    for path in ("/metrics", "/healthz", "/nowhere"):
        status, answer, body = admin(proxy, path, headers=headers)
        assert (status, answer["www-authenticate"]) == (401, "Bearer")
        assert TOKEN.encode() not in body


def test_only_get_and_head(proxy_factory):
    proxy = proxy_factory(OPERATIONS)
    status, headers, _ = admin(proxy, "/metrics", method="POST")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    assert admin(proxy, "/metrics", method="HEAD")[0] == 200
    assert admin(proxy, "/nowhere")[0] == 404


def test_the_proxy_refuses_to_reach_its_admin_port(proxy_factory, curl):
    """
    127.0.0.1 is allowlisted exactly, yet a request through the proxy to
    its own operations listener is refused as a local target: the
    listener is one of the proxy's own addresses.
    """
    proxy = proxy_factory(OPERATIONS)
    target = f"http://{proxy.ports['admin']}/metrics"
    result = curl.run(target, "-H", f"Authorization: Bearer {TOKEN}", proxy=proxy.http_url)
    assert (result.status, result.headers["x-proxy-error"]) == (403, "blocked-by-allowlist")
    assert result.json()["reason"] == "not_allowed_local"
    tunnel = curl.run(target, "--proxytunnel", proxy=proxy.http_url)
    assert tunnel.connect_status == 403
    port = int(proxy.ports["admin"].rpartition(":")[2])
    sock, rep, _ = socks_request(proxy.socks_addr, 1, "127.0.0.1", port)
    sock.close()
    assert rep == 2


def test_non_loopback_admin_url_stops_start_up(proxy_factory, proxyproc):
    with pytest.raises(proxyproc.ProxyStartError) as caught:
        proxy_factory(
            {
                **OPERATIONS,
                "admin_url": "0.0.0.0:0",
                "dangerously_allow_non_loopback_proxy": True,
            }
        )
    assert "network.admin_url: 0.0.0.0:0 is not on loopback" in str(caught.value)


def test_reloads_counted_by_result(proxy_factory, proxyproc):
    proxy = proxy_factory(OPERATIONS)
    proxy.config_path.write_text('[network]\nenabled = true\nmode = "fast"\n')
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_line("policy reload failed")
    proxy.config_path.write_text(
        proxyproc.render_config({**OPERATIONS, "denied_domains": ["other.example"]})
    )
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_line("policy reloaded")
    samples = scrape(proxy)
    assert value(samples, "codexproxy_reloads_total", result="failed") == 1
    assert value(samples, "codexproxy_reloads_total", result="ok") == 1
    status, _, body = admin(proxy, "/policy")
    assert [d["pattern"] for d in json.loads(body)["denied_domains"]] == ["other.example"]
