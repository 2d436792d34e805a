"""
C{x-unix-socket} targets through a real proxy (SPEC §8), driven by curl.
"""

from __future__ import annotations



import json


def _audit_events(proxy):
    """
    The decisions of a proxy started with C{--audit-log audit.jsonl}; the
    log is complete once the proxy has stopped (flushed on exit).
    """
    proxy.stop()
    lines = (proxy.workdir / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_allowed_socket_is_reached_without_the_domain_lists(proxy_factory, unix_origin, curl, tmp_path):
    """
    Through a symlink, to a host that is neither allowed nor resolvable and
    is even denied: only the socket path counts, and the header never
    reaches the origin.
    """
    link = tmp_path / "link.sock"
    link.symlink_to(unix_origin.path)
    proxy = proxy_factory(
        {"allow_unix_sockets": [str(link)], "denied_domains": ["local.invalid"]},
        args=("--audit-log", "audit.jsonl"),
    )

    result = curl.run(
        "http://local.invalid/v1/info",
        "-H", f"x-unix-socket: {unix_origin.path}",
        proxy=proxy.http_url,
    )

    assert (result.returncode, result.status) == (0, 200), result.stderr
    assert result.body == b"hello from origin /v1/info\n"
    [seen] = unix_origin.requests
    assert (seen.method, seen.path) == ("GET", "/v1/info")
    assert seen.header("Host") == "local.invalid"
    assert seen.header("x-unix-socket") is None
    event = _audit_events(proxy)[-1]
    assert (event["server.address"], event["server.port"]) == ("unix-socket", 0)
    assert event["network.policy.decision"] == "allow"


def test_socket_not_allowed_is_403(proxy_factory, unix_origin, curl, tmp_path):
    proxy = proxy_factory({"allow_unix_sockets": [str(tmp_path / "other.sock")]})

    result = curl.run(
        "http://127.0.0.1/", "-H", f"x-unix-socket: {unix_origin.path}", proxy=proxy.http_url
    )

    assert result.status == 403
    assert result.headers["x-proxy-error"] == "blocked-by-allowlist"
    body = result.json()
    assert (body["host"], body["port"], body["reason"]) == (
        "unix-socket", 0, "unix_socket_not_allowed"
    )
    assert unix_origin.requests == []


def test_limited_mode_applies_to_sockets(proxy_factory, unix_origin, curl):
    proxy = proxy_factory({"allow_unix_sockets": [str(unix_origin.path)], "mode": "limited"})

    get = curl.run("http://local/", "-H", f"x-unix-socket: {unix_origin.path}", proxy=proxy.http_url)
    post = curl.run(
        "http://local/", "-d", "x", "-H", f"x-unix-socket: {unix_origin.path}", proxy=proxy.http_url
    )

    assert get.status == 200
    assert (post.status, post.headers["x-proxy-error"]) == (403, "blocked-by-method-policy")
    assert [seen.method for seen in unix_origin.requests] == ["GET"]
