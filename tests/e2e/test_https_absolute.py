"""
Absolute-form C{https://} requests (SPEC §1): plain HTTP to the proxy, TLS
from the proxy to the origin, checked against the system roots plus
C{SSL_CERT_FILE} with host name checking.
"""

from __future__ import annotations


def _get(raw, proxy, origin, path: str = "/bytes/5000", method: str = "GET"):
    authority = f"localhost:{origin.port}"
    return raw(
        proxy.http_addr,
        f"{method} https://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )


def test_absolute_https_reaches_a_trusted_origin(proxy_factory, tls_files, tls_origin, raw, proxyproc):
    proxy = proxy_factory(env={"SSL_CERT_FILE": str(tls_files.cert)})
    response = _get(raw, proxy, tls_origin)
    assert response.status == 200
    assert response.body == proxyproc.pattern_bytes(5000)
    assert [(seen.method, seen.path) for seen in tls_origin.requests] == [("GET", "/bytes/5000")]


def test_absolute_https_to_an_untrusted_origin_is_502(proxy_factory, tls_origin, raw):
    proxy = proxy_factory()  # the origin's self-signed certificate is not trusted
    response = _get(raw, proxy, tls_origin)
    assert response.status == 502
    assert response.headers["x-proxy-error"] == "upstream-tls-failed"
    assert tls_origin.requests == []


def test_absolute_https_write_in_limited_mode_is_refused(proxy_factory, tls_files, tls_origin, raw):
    proxy = proxy_factory({"mode": "limited"}, env={"SSL_CERT_FILE": str(tls_files.cert)})
    response = _get(raw, proxy, tls_origin, "/sink", method="POST")
    assert response.status == 403
    assert response.headers["x-proxy-error"] == "blocked-by-method-policy"
    assert response.json()["protocol"] == "https"
    assert tls_origin.requests == []
