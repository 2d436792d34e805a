"""
The HTTP listener of a real C{twistd codexproxy} process, driven by curl and
raw sockets: what a user sees (status, C{x-proxy-error}, bytes) for allowed
traffic, each kind of block, tunnels, limited mode and start-up errors.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


def _assert_blocked(result, header: str, reason: str, host: str, port: int, **fields):
    """
    A 403 block as SPEC §4.2 describes it: header, then the JSON body.
    """
    assert result.status == 403, result
    assert result.headers["x-proxy-error"] == header
    body = result.json()
    assert body["status"] == "blocked"
    assert body["reason"] == reason
    assert body["host"] == host
    assert body["port"] == port
    assert body["decision"] == "deny"
    for key, value in fields.items():
        assert body[key] == value, (key, body)
    assert body["message"]


def _listening_ports(pid: int) -> set[int]:
    """
    The TCP ports in LISTEN state whose sockets C{pid} holds open.
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_get_allowed(proxy, origin, curl, proxyproc, host):
    """
    An exactly allowlisted loopback origin is reached, by IP and by name,
    and its bytes arrive intact.
    """
    result = curl.run(origin.url("/bytes/100000", host=host), proxy=proxy.http_url)

    assert (result.returncode, result.status) == (0, 200), result.stderr
    assert result.body == proxyproc.pattern_bytes(100000)
    [seen] = origin.requests
    assert (seen.method, seen.path) == ("GET", "/bytes/100000")
    assert seen.header("Host") == f"{host}:{origin.port}"


def test_post_large_body(proxy, origin, curl, tmp_path):
    """
    A 10 MB POST body reaches the origin byte for byte.
    """
    data = os.urandom(10 * 1000 * 1000)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    result = curl.run(
        origin.url("/sink"), "--data-binary", f"@{upload}", proxy=proxy.http_url
    )

    assert (result.returncode, result.status) == (0, 200), result.stderr
    assert result.json() == {"length": len(data), "sha256": digest}
    [seen] = origin.requests
    assert (seen.method, seen.body_length, seen.body_sha256) == (
        "POST",
        len(data),
        digest,
    )


def test_chunked_upload(proxy, origin, curl, tmp_path):
    """
    A chunked request body (no Content-Length) reaches the origin intact.
    """
    data = os.urandom(3 * 1000 * 1000 + 17)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)

    with upload.open("rb") as stdin:
        result = curl.run(
            origin.url("/sink"),
            "-X", "POST",
            "-T", "-",
            "-H", "Transfer-Encoding: chunked",
            proxy=proxy.http_url,
            stdin=stdin,
        )

    assert (result.returncode, result.status) == (0, 200), result.stderr
    [seen] = origin.requests
    assert (seen.body_length, seen.body_sha256) == (
        len(data),
        hashlib.sha256(data).hexdigest(),
    )


def test_keepalive_two_requests_one_connection(proxy, origin, curl, proxyproc):
    """
    Two requests on one client connection both succeed.
    """
    statuses, bodies, log = curl.run_many(
        [origin.url("/bytes/1000"), origin.url("/bytes/2000")], proxy=proxy.http_url
    )

    assert statuses == [200, 200], log
    assert bodies == [proxyproc.pattern_bytes(1000), proxyproc.pattern_bytes(2000)]
    assert "Re-using existing connection" in log
    assert [seen.path for seen in origin.requests] == ["/bytes/1000", "/bytes/2000"]


def test_gets_on_new_connections_share_one_origin_connection(proxy, origin, curl, proxyproc):
    """
    Two curl runs (two client connections, each closed after its response)
    reach the origin on one connection: the proxy parks it in between.
    """
    for size in (1000, 2000):
        result = curl.run(origin.url(f"/bytes/{size}"), proxy=proxy.http_url)
        assert (result.returncode, result.status) == (0, 200), result.stderr
        assert result.body == proxyproc.pattern_bytes(size)
    first, second = origin.requests
    assert first.peer == second.peer
    assert first.header("Connection") is None


def test_allowlist_miss(proxy, origin, curl):
    """
    A host on no list is blocked before any lookup or connection.
    """
    result = curl.run("http://blocked.example/", proxy=proxy.http_url)

    _assert_blocked(
        result,
        "blocked-by-allowlist",
        "not_allowed",
        "blocked.example",
        80,
        source="baseline_policy",
        protocol="http",
    )
    assert origin.requests == []


def test_deny_wins_over_allow(proxy_factory, origin, curl):
    """
    A host on both lists is denied; other allowlisted hosts still work.
    """
    proxy = proxy_factory({"denied_domains": ["localhost"]})

    blocked = curl.run(origin.url("/", host="localhost"), proxy=proxy.http_url)
    allowed = curl.run(origin.url("/", host="127.0.0.1"), proxy=proxy.http_url)

    _assert_blocked(
        blocked, "blocked-by-denylist", "denied", "localhost", origin.port
    )
    assert allowed.status == 200
    assert [seen.header("Host") for seen in origin.requests] == [
        f"127.0.0.1:{origin.port}"
    ]


def test_empty_allowlist_blocks_loopback(proxy_factory, origin, curl):
    """
    An empty allowlist blocks everything, loopback included.
    """
    proxy = proxy_factory({"allowed_domains": []})

    result = curl.run(origin.url("/"), proxy=proxy.http_url)

    _assert_blocked(
        result, "blocked-by-allowlist", "not_allowed_local", "127.0.0.1", origin.port
    )
    assert origin.requests == []


def test_wildcard_never_unlocks_local(proxy_factory, origin, curl):
    """
    A local literal that is not an exact allowlist entry is not_allowed_local.
    """
    proxy = proxy_factory({"allowed_domains": ["**.example"]})

    result = curl.run(origin.url("/"), proxy=proxy.http_url)

    _assert_blocked(
        result, "blocked-by-allowlist", "not_allowed_local", "127.0.0.1", origin.port
    )
    assert origin.requests == []


def test_connect_tls(proxy, tls_origin, tls_files, curl, proxyproc):
    """
    An HTTPS request tunnels through CONNECT end to end (full mode is opaque).
    """
    result = curl.run(
        tls_origin.url("/bytes/50000", host="localhost"),
        "--cacert", str(tls_files.cert),
        proxy=proxy.http_url,
    )

    assert (result.returncode, result.connect_status, result.status) == (
        0,
        200,
        200,
    ), result.stderr
    assert result.body == proxyproc.pattern_bytes(50000)
    assert [seen.path for seen in tls_origin.requests] == ["/bytes/50000"]


def test_connect_closed_port(proxy, tls_files, curl, closed_port):
    """
    We dial before answering a CONNECT, so a refused dial is a 502 with
    C{upstream-connect-failed}, not a 200 followed by a close.
    """
    result = curl.run(
        f"https://localhost:{closed_port}/",
        "--cacert", str(tls_files.cert),
        proxy=proxy.http_url,
    )

    assert result.returncode != 0
    assert result.connect_status == 502, result.stderr
    [(status, headers)] = result.header_blocks
    assert status == 502
    assert headers["x-proxy-error"] == "upstream-connect-failed"


def test_unresolvable_allowlisted_name(proxy_factory, curl):
    """
    An allowlisted name that does not resolve is a 502 C{upstream-dns-failed}.
    """
    proxy = proxy_factory(
        {"allowed_domains": ["127.0.0.1", "localhost", "nothing.invalid"]}
    )

    result = curl.run("http://nothing.invalid/", proxy=proxy.http_url)

    assert result.status == 502, result.stderr
    assert result.headers["x-proxy-error"] == "upstream-dns-failed"


def test_limited_mode_blocks_post(proxy_factory, origin, curl):
    """
    Limited mode refuses a write method without reaching the origin.
    """
    proxy = proxy_factory({"mode": "limited"})

    result = curl.run(origin.url("/sink"), "--data-binary", "x", proxy=proxy.http_url)

    _assert_blocked(
        result,
        "blocked-by-method-policy",
        "method_not_allowed",
        "127.0.0.1",
        origin.port,
        source="mode_guard",
    )
    assert origin.requests == []


def test_limited_mode_allows_get(proxy_factory, origin, curl, proxyproc):
    proxy = proxy_factory({"mode": "limited"})

    result = curl.run(origin.url("/bytes/10"), proxy=proxy.http_url)

    assert (result.status, result.body) == (200, proxyproc.pattern_bytes(10))
    assert [seen.method for seen in origin.requests] == ["GET"]


def test_limited_mode_connect_needs_mitm(
    proxy_factory, tls_origin, tls_files, curl, raw
):
    """
    Without MITM a limited-mode CONNECT is refused, as curl and the JSON show.
    """
    proxy = proxy_factory({"mode": "limited"})
    target = f"localhost:{tls_origin.port}"

    result = curl.run(
        tls_origin.url("/", host="localhost"),
        "--cacert", str(tls_files.cert),
        proxy=proxy.http_url,
    )
    direct = raw(
        proxy.http_addr, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    )

    assert result.connect_status == 403, result.stderr
    assert result.header_blocks[0][1]["x-proxy-error"] == "blocked-by-mitm-required"
    _assert_blocked(
        direct,
        "blocked-by-mitm-required",
        "mitm_required",
        "localhost",
        tls_origin.port,
        protocol="https_connect",
        source="mode_guard",
    )
    assert tls_origin.requests == []


def test_absolute_form_with_other_host_header(proxy, origin, raw):
    """
    An absolute-form target and a Host naming another host is a 400 and
    nothing is forwarded (SPEC §4.2a).
    """
    response = raw(
        proxy.http_addr,
        (
            f"GET {origin.url('/')} HTTP/1.1\r\n"
            "Host: elsewhere.example\r\n"
            "Connection: close\r\n\r\n"
        ).encode(),
    )

    assert response.status == 400
    assert origin.requests == []


@pytest.mark.parametrize(
    ("network", "needles"),
    [
        ({"mode": "fast"}, ["network.mode", "fast"]),
        (
            {"allowed_domains": None, "allowd_domains": ["localhost"]},
            ["network.allowd_domains", "did you mean", "allowed_domains"],
        ),
    ],
    ids=["bad-mode", "unknown-key"],
)
def test_bad_config_exits(proxyproc, tmp_path, network, needles):
    """
    A bad config stops start-up with a non-zero exit, a message naming the
    dotted key, no traceback, and no ports file.
    """
    done = proxyproc.run_to_exit(network, tmp_path)
    output = done.stdout + done.stderr

    assert done.returncode != 0, output
    for needle in needles:
        assert needle.lower() in output.lower(), output
    assert "Traceback" not in output
    assert not (tmp_path / "ports.json").exists()


def test_disabled_binds_nothing(proxy_factory):
    """
    C{enabled = false} keeps the process up, says so, and listens nowhere.
    """
    proxy = proxy_factory({"enabled": False})

    assert proxy.ports == {}
    assert any("disabled" in line for line in proxy.output_lines), proxy.output
    assert proxy.process.poll() is None
    assert _listening_ports(proxy.pid) == set()


def test_tunnel_memory_is_bounded(proxy, proxyproc):
    """
    A slow reader of a 256 MiB tunnel does not make the proxy buffer: its
    RSS grows by less than 32 MiB and every byte arrives.
    """
    total = 256 << 20
    with proxyproc.StreamingOrigin(total) as source:
        sock, early = proxyproc.open_tunnel(
            proxy.http_addr, f"127.0.0.1:{source.port}", rcvbuf=64 << 10
        )
        with sock:
            result = proxyproc.read_stream(
                sock, len(early), recv_size=1024, rss_pid=proxy.pid
            )

    assert result.received == total
    assert source.errors == []
    assert len(result.samples) == total // (16 << 20)
    assert result.growth < 32 << 20, (result.baseline_rss, result.samples)
