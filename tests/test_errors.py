"""
The proxy's own replies: their bytes, and their constant part rendered once.
"""

from __future__ import annotations

from codex_proxy import errors


def test_a_reply_head_is_rendered_once_per_status_and_header():
    errors._head_start.cache_clear()
    first = errors.render(403, "blocked-by-allowlist", {"a": 1}, keep_alive=True)
    second = errors.render(403, "blocked-by-allowlist", {"a": 22}, keep_alive=False, with_body=False)
    assert first == (
        b"HTTP/1.1 403 Forbidden\r\nx-proxy-error: blocked-by-allowlist\r\n"
        b"Content-Type: application/json\r\nContent-Length: 8\r\nConnection: keep-alive\r\n\r\n"
        b'{"a":1}\n'
    )
    assert second == (
        b"HTTP/1.1 403 Forbidden\r\nx-proxy-error: blocked-by-allowlist\r\n"
        b"Content-Type: application/json\r\nContent-Length: 9\r\nConnection: close\r\n\r\n"
    )
    assert errors._head_start.cache_info().misses == 1


def test_a_reply_without_an_error_header_has_none():
    assert errors.render(400, None, {}, keep_alive=False) == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\n{}\n"
    )
