"""
HTTPS interception of a real C{twistd codexproxy} (limited mode, C{mitm =
true}): curl and Python's C{ssl} + C{http.client} trust the proxy's CA, the
proxy trusts the local TLS origin through C{SSL_CERT_FILE}; reads pass,
writes are refused inside TLS, an untrusted origin is a 502.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat

import pytest
from support.socksclient import socks_request

LIMITED_MITM = {"mode": "limited", "mitm": True}


@pytest.fixture
def mitm_proxy(proxy_factory, tls_files):
    """
    A limited-mode MITM proxy that trusts the TLS origin's certificate.
    """
    return proxy_factory(LIMITED_MITM, env={"SSL_CERT_FILE": str(tls_files.cert)})


def _ca(proxy) -> str:
    return str(proxy.codex_home / "proxy" / "ca.pem")


def test_curl_get_and_post_inside_tls(mitm_proxy, tls_origin, curl, proxyproc):
    """
    GET reaches the origin through the intercepted tunnel; POST is refused
    by the proxy with 403 and never reaches it.
    """
    url = tls_origin.url("/bytes/20000", host="localhost")

    got = curl.run(url, "--cacert", _ca(mitm_proxy), proxy=mitm_proxy.http_url)
    posted = curl.run(
        tls_origin.url("/sink", host="localhost"),
        "--cacert", _ca(mitm_proxy), "--data-binary", "secret",
        proxy=mitm_proxy.http_url,
    )

    assert (got.returncode, got.connect_status, got.status) == (0, 200, 200), got.stderr
    assert got.body == proxyproc.pattern_bytes(20000)
    assert posted.status == 403, posted.stderr
    assert posted.headers["x-proxy-error"] == "blocked-by-method-policy"
    body = posted.json()
    assert (body["reason"], body["protocol"], body["host"]) == (
        "method_not_allowed", "https", "localhost"
    )
    assert [(seen.method, seen.path) for seen in tls_origin.requests] == [
        ("GET", "/bytes/20000")
    ]


def test_ca_files_are_private_and_reused(mitm_proxy, proxyproc):
    """
    The CA key is 0600 in a 0700 directory; a restart on the same
    CODEX_HOME reuses the same bytes; the bundle ends with our CA.
    """
    directory = mitm_proxy.codex_home / "proxy"
    pem = (directory / "ca.pem").read_bytes()
    key = (directory / "ca.key").read_bytes()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(directory / "ca.key").st_mode) == 0o600
    assert (directory / "ca-bundle.pem").read_bytes().endswith(pem)

    mitm_proxy.stop()
    again = proxyproc.start_proxy(LIMITED_MITM, mitm_proxy.workdir)
    try:
        assert (directory / "ca.pem").read_bytes() == pem
        assert (directory / "ca.key").read_bytes() == key
    finally:
        again.stop()


def test_python_http_client_through_the_tunnel(mitm_proxy, tls_origin):
    """
    Python's own TLS and HTTP client, on one kept-alive intercepted
    connection: GET 200 with the origin's bytes, then POST 403.
    """
    context = ssl.create_default_context(cafile=_ca(mitm_proxy))
    host, port = mitm_proxy.http_addr
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    conn.set_tunnel("localhost", tls_origin.port)
    try:
        conn.request("GET", "/hello")
        first = conn.getresponse()
        first_body = first.read()
        conn.request("POST", "/sink", body=b"data")
        second = conn.getresponse()
        second_body = json.loads(second.read())
    finally:
        conn.close()

    assert (first.status, first_body) == (200, b"hello from origin /hello\n")
    assert second.status == 403
    assert second.getheader("x-proxy-error") == "blocked-by-method-policy"
    assert second_body["protocol"] == "https"
    assert [seen.method for seen in tls_origin.requests] == ["GET"]


def test_untrusted_origin_certificate_is_502(proxy_factory, tls_origin, curl):
    """
    Without SSL_CERT_FILE the origin's self-signed certificate is not
    trusted: the inner request gets 502 upstream-tls-failed.
    """
    proxy = proxy_factory(LIMITED_MITM)

    result = curl.run(
        tls_origin.url("/", host="localhost"), "--cacert", _ca(proxy), proxy=proxy.http_url
    )

    assert result.status == 502, result.stderr
    assert result.headers["x-proxy-error"] == "upstream-tls-failed"
    assert tls_origin.requests == []


def test_sni_naming_another_host_fails_the_handshake(mitm_proxy, tls_origin, proxyproc):
    """
    A ClientHello whose SNI differs from the CONNECT host is refused by the
    handshake itself.
    """
    sock, early = proxyproc.open_tunnel(mitm_proxy.http_addr, f"localhost:{tls_origin.port}")
    context = ssl.create_default_context(cafile=_ca(mitm_proxy))
    context.check_hostname = False
    with sock, pytest.raises(ssl.SSLError):
        context.wrap_socket(sock, server_hostname="elsewhere.test")
    assert tls_origin.requests == []


@pytest.mark.parametrize(
    "name, content",
    [("ca.key", None), ("ca.pem", None)],
    ids=["only-key", "only-cert"],
)
def test_one_ca_file_of_two_stops_start_up(proxyproc, tmp_path, name, content):
    """
    Exactly one CA file present: start-up fails naming the missing one,
    which is not created.
    """
    directory = tmp_path / "codex-home" / "proxy"
    directory.mkdir(parents=True, mode=0o700)
    (directory / name).write_text("x")
    os.chmod(directory / name, 0o600)

    done = proxyproc.run_to_exit(LIMITED_MITM, tmp_path)

    missing = "ca.pem" if name == "ca.key" else "ca.key"
    assert done.returncode != 0
    assert f"{missing}: missing" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (directory / missing).exists()


#: A loopback address of its own for an origin on the HTTPS port, which
#: SOCKS5 interception needs (SPEC §6: port 443 only).
ORIGIN_443 = ("127.0.0.43", 443)


def test_socks5_connect_to_443_is_intercepted_in_limited_mode(
    proxy_factory, tls_files, tls_origin_at, curl, proxyproc
):
    """
    SPEC §6: C{curl --socks5-hostname} gets read-only HTTPS instead of REP
    0x02: GET passes, POST is refused inside TLS and never reaches the
    origin; the leaf is for the requested name.
    """
    tls_origin_443 = tls_origin_at(ORIGIN_443)
    proxy = proxy_factory(
        {**LIMITED_MITM, "enable_socks5": True, "socks_url": "127.0.0.1:0"},
        args=("--resolve", f"localhost={ORIGIN_443[0]}"),
        env={"SSL_CERT_FILE": str(tls_files.cert)},
    )
    socks = f"socks5h://{proxy.ports['socks']}"

    got = curl.run("https://localhost/bytes/20000", "--cacert", _ca(proxy), proxy=socks)
    posted = curl.run(
        "https://localhost/sink", "--cacert", _ca(proxy), "--data-binary", "secret", proxy=socks
    )

    assert (got.returncode, got.status) == (0, 200), got.stderr
    assert got.body == proxyproc.pattern_bytes(20000)
    assert posted.status == 403, posted.stderr
    assert posted.headers["x-proxy-error"] == "blocked-by-method-policy"
    assert (posted.json()["reason"], posted.json()["protocol"]) == ("method_not_allowed", "https")
    assert [(seen.method, seen.path) for seen in tls_origin_443.requests] == [
        ("GET", "/bytes/20000")
    ]
    control, rep, _ = socks_request(proxy.socks_addr, 1, "localhost", 8443)
    control.close()
    assert rep == 0x02  # other ports carry bytes nobody can method-check
    proxy.wait_for_line("deny (method_not_allowed) for socks5_tcp localhost:8443")
