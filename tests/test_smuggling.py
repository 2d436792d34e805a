"""
Request smuggling, end to end through the HTTP listener: every shape of the
hardening issue is answered 400, the connection is closed, and the
destination receives nothing, both on the plain listener and inside an
intercepted (MITM) tunnel. Responses with the same shapes are 502.
"""

from __future__ import annotations

import pytest

from support.http import Harness
from support.mitm import World

#: (id, request head lines after the request line, body) on a POST/GET that
#: would otherwise be allowed. Each is broken in exactly one way.
_HOST = b"Host: origin.test\r\n"
SHAPES = [
    ("cl-and-te", b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te-and-cl", b"POST / HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    ("duplicate-cl", b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
    ("list-cl", b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: 5, 5\r\n\r\nhello"),
    ("plus-cl", b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: +5\r\n\r\nhello"),
    ("minus-cl", b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: -5\r\n\r\nhello"),
    ("space-in-cl", b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: 5 0\r\n\r\nhello"),
    ("hex-cl", b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: 0x5\r\n\r\nhello"),
    ("non-hex-chunk", b"POST / HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\n\r\nz\r\nhello\r\n0\r\n\r\n"),
    ("0x-chunk", b"POST / HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
    ("lf-in-chunk-ext", b"POST / HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\n\r\n5;a=b\nc\r\nhello\r\n0\r\n\r\n"),
    ("bare-lf-chunk-line", b"POST / HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
    ("chunk-data-overrun", b"POST / HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n"),
    ("bare-lf", b"GET / HTTP/1.1\n" + b"Host: origin.test\n\n"),
    ("bare-lf-header", b"GET / HTTP/1.1\r\nHost: origin.test\nX: y\r\n\r\n"),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: origin.test\rX: y\r\n\r\n"),
    ("space-before-colon", b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length : 5\r\n\r\nhello"),
    ("tab-before-colon", b"POST / HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n"),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + _HOST + b"X-A: 1\r\n  folded\r\n\r\n"),
    ("obs-fold-te", b"POST / HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
    ("nul-in-uri", b"GET /a\x00b HTTP/1.1\r\n" + _HOST + b"\r\n"),
    ("cr-in-uri", b"GET /a\rb HTTP/1.1\r\n" + _HOST + b"\r\n"),
    ("lf-in-uri", b"GET /a\nb HTTP/1.1\r\n" + _HOST + b"\r\n"),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + _HOST + b"X-A: a\x00b\r\n\r\n"),
    ("cr-in-value", b"GET / HTTP/1.1\r\n" + _HOST + b"X-A: a\rb\r\n\r\n"),
    ("te-http10", b"POST / HTTP/1.0\r\n" + _HOST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two-hosts", b"GET / HTTP/1.1\r\n" + _HOST + b"Host: evil.test\r\n\r\n"),
]

#: Absolute-form targets only the plain listener sees (inside a tunnel the
#: target must be the tunnel's host).
ABSOLUTE = [
    ("userinfo", b"GET http://user:pw@origin.test/ HTTP/1.1\r\n" + _HOST + b"\r\n"),
    ("userinfo-at-only", b"GET http://@origin.test/ HTTP/1.1\r\n" + _HOST + b"\r\n"),
    ("empty-host", b"GET http:///path HTTP/1.1\r\n" + _HOST + b"\r\n"),
    ("empty-host-port", b"GET http://:80/ HTTP/1.1\r\n" + _HOST + b"\r\n"),
]


def _absolute(request: bytes) -> bytes:
    """
    The same request in the absolute-form a proxy client sends.
    """
    line, sep, rest = request.partition(b" /")
    return line + b" http://origin.test/" + rest if sep else request


#: Shapes inside a chunked body: the head before them is valid, so the
#: request is decided and dialled first (bodies stream, never held whole).
BODY_SHAPES = {"non-hex-chunk", "0x-chunk", "lf-in-chunk-ext", "bare-lf-chunk-line", "chunk-data-overrun"}


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickle"])
@pytest.mark.parametrize("shape", SHAPES + ABSOLUTE, ids=[s[0] for s in SHAPES + ABSOLUTE])
def test_listener_refuses_and_forwards_nothing(trickle, shape):
    name, request = shape
    h = Harness(trickle)
    h.send(request if shape in ABSOLUTE else _absolute(request))
    if name in BODY_SHAPES:
        # The destination gets the validated head and no body byte, and is
        # closed: it holds an unfinished message, never a second request.
        _, upstream = h.accept()
        head, _, body = upstream.value().partition(b"\r\n\r\n")
        assert head.startswith(b"POST / HTTP/1.1\r\n") and body == b""
        assert upstream.disconnecting
    else:
        assert h.dials() == []
    status, headers, _ = h.response()
    assert status == 400, h.client.value()
    assert h.client.disconnecting


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickle"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_mitm_tunnel_refuses_and_forwards_nothing(tmp_path, trickle, shape):
    """
    Inside the tunnel (limited mode) a request with a body is refused by the
    method guard (403) before its body is read; every other shape is 400.
    """
    name, request = shape
    w = World(tmp_path, trickle)
    w.connect()
    w.client()
    answer = w.request(request)
    status = b"403" if name in BODY_SHAPES else b"400"
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
    assert b"Connection: close\r\n" in answer
    assert w.downstream.disconnecting
    assert w.origin_saw() == b""


#: Response shapes an origin might send; each is a 502 and closes the
#: destination connection (nothing of it reaches the client).
RESPONSES = [
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("duplicate-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"),
    ("list-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"),
    ("plus-cl", b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello"),
    ("minus-cl", b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello"),
    ("space-in-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 5 0\r\n\r\nhello"),
    ("non-hex-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nz\r\nhello\r\n0\r\n\r\n"),
    ("0x-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
    ("lf-in-chunk-ext", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n"),
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("bare-cr", b"HTTP/1.1 200 OK\r\nContent-Length: 0\rX: y\r\n\r\n"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n"),
    ("nul-in-value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n"),
    ("te-http10", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
]

GET = b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n"


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "trickle"])
@pytest.mark.parametrize("shape", RESPONSES, ids=[s[0] for s in RESPONSES])
def test_origin_responses_with_the_same_shapes_are_502(trickle, shape):
    _, response = shape
    h = Harness(trickle)
    h.send(GET)
    server, upstream = h.accept()
    h.answer(server, response)
    raw = h.client.value()
    if raw.startswith(b"HTTP/1.1 200 "):
        # Broken chunking after a valid head: the head was relayed, the
        # broken body is not, and the client connection is cut.
        assert b"hello" not in raw and h.client.disconnecting
    else:
        status, headers, _ = h.response()
        assert (status, headers["x-proxy-error"]) == (502, "upstream-bad-response")
    assert upstream.disconnecting
