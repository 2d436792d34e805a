"""
Tests for L{codex_proxy._httphead}, L{codex_proxy._httpbody} and the head
rewriting of L{codex_proxy._httptarget}: every wire case runs twice, once whole
and once fed one byte at a time.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codex_proxy._httpbody import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    ChunkedReader as _ChunkedReader,
    HeadLimits,
    Length,
    LengthReader,
    UntilCloseReader,
    body_reader as _body_reader,
)
from codex_proxy._httphead import RequestHeadParser, ResponseHeadParser
from codex_proxy._httptarget import (
    HOP_BY_HOP,
    serialize_request_head,
    serialize_response_head,
    strip_hop_by_hop,
)
from codex_proxy.errors import ProtocolError
from support.fuzzing import fuzz_settings


def ChunkedReader(decode: bool = False, limits: HeadLimits = HeadLimits()) -> _ChunkedReader:
    """
    A chunked reader with the default head limits unless told otherwise.
    """
    return _ChunkedReader(limits, decode=decode)


def body_reader(framing, **kw):
    return _body_reader(framing, HeadLimits(), **kw)


def _splits(data: bytes) -> list[list[bytes]]:
    """
    The two ways every case is fed: whole, and one byte at a time.
    """
    return [[data], [data[i : i + 1] for i in range(len(data))]]


def _feed_head(make, data: bytes):
    """
    Feed C{data} to a fresh head parser both ways; both must agree on the
    head and on everything after it.
    """
    results = []
    for pieces in _splits(data):
        parser = make()
        result = None
        for index, piece in enumerate(pieces):
            result = parser.feed(piece)
            if result is not None:
                head, leftover = result
                result = (head, leftover + b"".join(pieces[index + 1 :]))
                assert parser.buffered == 0
                break
        results.append(result)
    assert results[0] == results[1]
    return results[0]


def _reject_head(make, data: bytes) -> int:
    """
    Feed C{data} both ways; both must raise the same status, naming the
    same fault, before (or when) the data ends.
    """
    errors = []
    for pieces in _splits(data):
        parser = make()
        try:
            for piece in pieces:
                assert parser.feed(piece) is None, f"accepted {data!r}"
        except ProtocolError as error:
            errors.append((error.status, error.message))
        else:
            pytest.fail(f"no error for {data!r}")
    assert errors[0] == errors[1], data
    return errors[0][0]


def request(data: bytes, limits: HeadLimits = HeadLimits()):
    return _feed_head(lambda: RequestHeadParser(limits), data)


def reject_request(data: bytes, limits: HeadLimits = HeadLimits()) -> int:
    return _reject_head(lambda: RequestHeadParser(limits), data)


def response(data: bytes, method: str = "GET"):
    return _feed_head(lambda: ResponseHeadParser(method), data)


def reject_response(data: bytes, method: str = "GET") -> int:
    return _reject_head(lambda: ResponseHeadParser(method), data)


def read_body(make, data: bytes) -> tuple[bytes, bool, bytes]:
    """
    Feed C{data} to a fresh body reader both ways; return (all forwarded
    bytes, complete?, leftover), which must agree.
    """
    results = []
    for pieces in _splits(data):
        reader = make()
        forwarded, done, leftover = [], False, b""
        for index, piece in enumerate(pieces):
            out, done, leftover = reader.feed(piece)
            forwarded.append(out)
            if done:
                leftover += b"".join(pieces[index + 1 :])
                break
        results.append((b"".join(forwarded), done, leftover))
    assert results[0] == results[1]
    return results[0]


def reject_body(make, data: bytes) -> None:
    """
    Feed C{data} to a fresh body reader both ways; both must raise a 400
    before the body completes.
    """
    for pieces in _splits(data):
        reader = make()
        try:
            for piece in pieces:
                assert not reader.feed(piece)[1], f"accepted {data!r}"
        except ProtocolError as error:
            assert error.status == 400, data
        else:
            pytest.fail(f"no error for {data!r}")


# Request forms -------------------------------------------------------------


REQUEST_TARGET_FORMS = [
    ("http://example.com/a?b=1#frag", "absolute", "http", "example.com", 80, "/a?b=1"),
    ("HTTP://Example.com", "absolute", "http", "Example.com", 80, "/"),
    ("http://example.com?q", "absolute", "http", "example.com", 80, "/?q"),
    ("https://example.com:8443/x", "absolute", "https", "example.com", 8443, "/x"),
    ("https://example.com/", "absolute", "https", "example.com", 443, "/"),
    ("ws://example.com/chat", "absolute", "ws", "example.com", 80, "/chat"),
    ("wss://example.com/chat", "absolute", "wss", "example.com", 443, "/chat"),
    ("ftp://example.com/f", "absolute", "ftp", "example.com", None, "/f"),
    ("http://[::1]:8080/", "absolute", "http", "[::1]", 8080, "/"),
    ("http://127.0.0.1/", "absolute", "http", "127.0.0.1", 80, "/"),
    ("/index.html?x=1", "origin", None, None, None, "/index.html?x=1"),
]


def test_request_target_forms():
    for target, form, scheme, host, port, path in REQUEST_TARGET_FORMS:
        head, leftover = request(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % target.encode())
        parsed = (head.form, head.scheme, head.host, head.port, head.path)
        assert parsed == (form, scheme, host, port, path), target
        assert (head.method, head.target, leftover) == ("GET", target, b"")


CONNECT_AUTHORITY_FORM = [
    ("example.com:443", "example.com", 443),
    ("[2001:db8::1]:8443", "[2001:db8::1]", 8443),
    ("10.0.0.1:22", "10.0.0.1", 22),
]


def test_connect_authority_form():
    for target, host, port in CONNECT_AUTHORITY_FORM:
        head, _ = request(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % ((target.encode(),) * 2))
        parsed = (head.form, head.scheme, head.host, head.port, head.path)
        assert parsed == ("authority", None, host, port, ""), target
        assert head.framing == NO_BODY


def test_asterisk_form():
    head, _ = request(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (head.form, head.host, head.port, head.path) == ("asterisk", None, None, "")


def test_defaults_of_a_plain_request():
    head, _ = request(b"GET / HTTP/1.1\r\nHost:  example.com \t\r\nX-Empty:\r\n\r\n")
    assert head.version == (1, 1)
    assert head.headers == ((b"Host", b"example.com"), (b"X-Empty", b""))
    assert head.header(b"HOST") == b"example.com"
    assert head.header(b"missing") is None
    assert head.framing == NO_BODY
    assert head.keep_alive is True
    assert head.upgrade is False
    assert head.expect_continue is False


def test_header_names_keep_their_case_and_order():
    head, _ = request(b"GET / HTTP/1.1\r\nX-A: 1\r\nhost: h\r\nx-a: 2\r\n\r\n")
    assert head.headers == ((b"X-A", b"1"), (b"host", b"h"), (b"x-a", b"2"))
    assert head.header(b"x-A") == b"1"


def test_leading_empty_lines_are_skipped():
    head, leftover = request(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert head.path == "/"
    assert leftover == b""


REQUEST_KEEP_ALIVE = [
    (b"1.1", None, True),
    (b"1.1", b"close", False),
    (b"1.1", b"Keep-Alive, CLOSE", False),
    (b"1.1", b"upgrade", True),
    (b"1.0", None, False),
    (b"1.0", b"keep-alive", True),
    (b"1.0", b"Keep-Alive", True),
    (b"1.0", b"close", False),
]


def test_request_keep_alive():
    for version, connection, keep_alive in REQUEST_KEEP_ALIVE:
        fields = b"Connection: %s\r\n" % connection if connection else b""
        head, _ = request(b"GET / HTTP/%s\r\nHost: h\r\n%s\r\n" % (version, fields))
        assert head.keep_alive is keep_alive, (version, connection)


REQUEST_FRAMING = [
    (b"", NO_BODY),
    (b"Content-Length: 0\r\n", NO_BODY),
    (b"Content-Length: 5\r\n", Length(5)),
    (b"Content-Length: 007\r\n", Length(7)),
    (b"Content-Length: \t 5 \r\n", Length(5)),
    (b"Content-Length: 999999999999999999\r\n", Length(999999999999999999)),
    (b"Transfer-Encoding: chunked\r\n", CHUNKED),
    (b"Transfer-Encoding: Chunked\r\n", CHUNKED),
]


def test_request_framing():
    for fields, framing in REQUEST_FRAMING:
        head, _ = request(b"POST / HTTP/1.1\r\nHost: h\r\n%s\r\n" % fields)
        assert head.framing == framing, fields


def test_upgrade_and_expect():
    head, _ = request(
        b"GET ws://h/ HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Expect: 100-Continue\r\n\r\n"
    )
    assert head.upgrade is True
    assert head.expect_continue is True


def test_expect_continue_is_ignored_on_http_10():
    head, _ = request(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
    assert head.expect_continue is False


def test_pipelined_requests_come_out_one_by_one():
    first = b"POST /one HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"
    second = b"GET /two HTTP/1.1\r\nHost: h\r\n\r\n"
    head, leftover = request(first + b"abc" + second)
    assert (head.path, head.framing, leftover) == ("/one", Length(3), b"abc" + second)
    parser = RequestHeadParser()
    _, rest = parser.feed(first + b"abc" + second)
    body, done, after = LengthReader(3).feed(rest)
    assert (body, done, after) == (b"abc", True, second)
    head, leftover = parser.feed(after)
    assert (head.path, leftover) == ("/two", b"")


# Request rejections --------------------------------------------------------


REQUEST_REJECTIONS = [
    # line endings
    (b"GET / HTTP/1.1\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\n\n", 400),
    (b"GET / HTTP/1.1\rHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400),
    (b"\nGET / HTTP/1.1\r\n\r\n", 400),
    (b"\r\rGET / HTTP/1.1\r\n\r\n", 400),
    (b"\r\n\rGET / HTTP/1.1\r\n\r\n", 400),
    # request line
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1 \r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\n\r\n", 400),
    (b"GET /a\x00b HTTP/1.1\r\n\r\n", 400),
    (b"GET /a\tb HTTP/1.1\r\n\r\n", 400),
    (b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
    (b"GET / http/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / HTTP/1.2\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\n\r\n", 505),
    # fields
    (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost\t: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n  folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\tX: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n: empty\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX(y): a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # framing
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 5 5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1234567890123456789\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 501),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    # absolute-form
    (b"GET http://u:p@example.com/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://u@example.com/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http:///path HTTP/1.1\r\n\r\n", 400),
    (b"GET http://:80/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://example.com:/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://example.com:0/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://example.com:65536/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://example.com:123456/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://example.com:8a/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://exa%6dple.com/ HTTP/1.1\r\n\r\n", 400),
    (b"GET mailto:a@b HTTP/1.1\r\n\r\n", 400),
    (b"GET 1http://example.com/ HTTP/1.1\r\n\r\n", 400),
    # authority-form
    (b"CONNECT example.com HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT example.com: HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT example.com:0 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT example.com:70000 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT :443 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT u@example.com:443 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT [::1] HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT http://example.com:443 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT /path HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT * HTTP/1.1\r\n\r\n", 400),
    (b"GET example.com:443 HTTP/1.1\r\n\r\n", 400),
    (b"GET example.com HTTP/1.1\r\n\r\n", 400),
    (b"GET * HTTP/1.1\r\n\r\n", 400),
]


def test_request_rejections():
    for data, status in REQUEST_REJECTIONS:
        assert reject_request(data) == status, data


# Limits --------------------------------------------------------------------

SMALL = HeadLimits(max_request_line_bytes=64, max_header_bytes=256, max_header_fields=4)


def test_request_line_at_the_limit_is_accepted():
    line = b"GET /" + b"a" * (64 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == 64
    head, _ = request(line + b"\r\n\r\n", SMALL)
    assert head.method == "GET"


def test_request_line_over_the_limit_is_414():
    line = b"GET /" + b"a" * (65 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert reject_request(line + b"\r\n\r\n", SMALL) == 414


def test_414_before_the_line_ends():
    parser = RequestHeadParser(SMALL)
    assert parser.feed(b"GET /" + b"a" * 59) is None
    with pytest.raises(ProtocolError) as caught:
        parser.feed(b"a")
    assert caught.value.status == 414


def test_431_before_the_head_ends():
    parser = RequestHeadParser(SMALL)
    assert parser.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 200) is None
    with pytest.raises(ProtocolError) as caught:
        parser.feed(b"a" * 100)
    assert caught.value.status == 431


def test_head_size_limit_counts_the_blank_line():
    start = b"GET / HTTP/1.1\r\nX: "
    exact = start + b"a" * (256 - len(start) - 4) + b"\r\n\r\n"
    assert len(exact) == 256
    head, _ = request(exact, SMALL)
    assert len(head.headers[0][1]) == 256 - len(start) - 4
    over = start + b"a" * (256 - len(start) - 3) + b"\r\n\r\n"
    assert reject_request(over, SMALL) == 431


def test_field_count_limit():
    four = b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 4
    head, _ = request(four + b"\r\n", SMALL)
    assert len(head.headers) == 4
    assert reject_request(four + b"X: 1\r\n", SMALL) == 431


def test_leading_empty_lines_are_not_buffered():
    parser = RequestHeadParser(SMALL)
    for _ in range(1000):
        assert parser.feed(b"\r\n") is None
    assert parser.buffered == 0
    assert parser.feed(b"\r") is None
    assert parser.buffered == 1
    head, _ = parser.feed(b"\nGET / HTTP/1.1\r\n\r\n")
    assert head.path == "/"


# Responses -----------------------------------------------------------------


RESPONSE_FRAMING = [
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Length(3), True),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", NO_BODY, True),
    ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", CHUNKED, True),
    ("GET", b"HTTP/1.1 200 OK\r\n\r\n", UNTIL_CLOSE, False),
    ("GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", UNTIL_CLOSE, False),
    ("GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
     Length(1), False),
    ("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Length(1), False),
    ("GET", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
     Length(1), True),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", NO_BODY, True),
    ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", NO_BODY, True),
    ("GET", b"HTTP/1.1 100 Continue\r\n\r\n", NO_BODY, True),
    ("GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", NO_BODY, True),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", NO_BODY, True),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", NO_BODY, True),
    ("CONNECT", b"HTTP/1.1 200 Connection established\r\n\r\n", NO_BODY, True),
    ("CONNECT", b"HTTP/1.1 407 Auth\r\nContent-Length: 2\r\n\r\n", Length(2), True),
]


def test_response_framing():
    for method, data, framing, keep_alive in RESPONSE_FRAMING:
        head, leftover = response(data, method)
        assert (head.framing, head.keep_alive, leftover) == (framing, keep_alive, b""), data


def test_response_fields():
    head, leftover = response(b"HTTP/1.1 404 Not  Found\r\nServer: x\r\n\r\nbody")
    assert (head.version, head.status, head.reason) == ((1, 1), 404, b"Not  Found")
    assert head.header(b"server") == b"x"
    assert leftover == b"body"


@pytest.mark.parametrize("line", [b"HTTP/1.1 200", b"HTTP/1.1 200 "])
def test_response_empty_reason(line):
    head, _ = response(line + b"\r\nContent-Length: 0\r\n\r\n")
    assert (head.status, head.reason) == (200, b"")


def test_interim_responses_come_out_one_by_one():
    parser = ResponseHeadParser("POST")
    interim, rest = parser.feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    assert interim.status == 100
    final, rest = parser.feed(rest)
    assert (final.status, final.framing, rest) == (201, NO_BODY, b"")


RESPONSE_REJECTIONS = [
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 099 Odd\r\n\r\n",
    b"HTTP/1.1  200 OK\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/1.1 200 O\x00K\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
]


def test_response_rejections_answer_502():
    for data in RESPONSE_REJECTIONS:
        assert reject_response(data) == 502, data


def test_response_head_limits_answer_502():
    assert reject_response(b"HTTP/1.1 200 " + b"x" * 9000 + b"\r\n\r\n") == 502
    assert reject_response(b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"\r\n") == 502


# Bodies --------------------------------------------------------------------

CHUNKED_BODY = (
    b"5;name=value;q=\"a \\\"b\"\r\nhello\r\n"
    b"1A\r\n" + b"x" * 26 + b"\r\n"
    b"0;last\r\nX-Trailer: 1\r\nY: 2\r\n\r\n"
)


def test_chunked_passthrough_forwards_the_wire_bytes():
    forwarded, done, leftover = read_body(ChunkedReader, CHUNKED_BODY + b"NEXT")
    assert (forwarded, done, leftover) == (CHUNKED_BODY, True, b"NEXT")


def test_chunked_decode_forwards_only_the_payload():
    forwarded, done, leftover = read_body(
        lambda: ChunkedReader(decode=True), CHUNKED_BODY + b"NEXT"
    )
    assert (forwarded, done, leftover) == (b"hello" + b"x" * 26, True, b"NEXT")


def test_chunked_without_trailers():
    body = b"3\r\nabc\r\n0\r\n\r\n"
    assert read_body(ChunkedReader, body) == (body, True, b"")
    assert read_body(lambda: ChunkedReader(decode=True), body) == (b"abc", True, b"")


def test_chunked_holds_back_only_an_unfinished_line():
    reader = ChunkedReader()
    assert reader.feed(b"1") == (b"", False, b"")
    assert reader.buffered == 1
    assert reader.feed(b"0\r\n" + b"a" * 10) == (b"10\r\n" + b"a" * 10, False, b"")
    assert reader.buffered == 0
    assert reader.feed(b"b" * 6 + b"\r") == (b"b" * 6, False, b"")
    assert reader.feed(b"\n0\r\n\r\nrest") == (b"\r\n0\r\n\r\n", True, b"rest")
    assert reader.feed(b"more") == (b"", True, b"more")


def test_chunk_data_is_passed_through_without_copying():
    reader = ChunkedReader()
    reader.feed(b"100000\r\n")
    data = b"z" * 0x100000
    forwarded, done, _ = reader.feed(data)
    assert forwarded is data
    assert not done


CHUNKED_REJECTIONS = [
    b"0x10\r\n",
    b"+a\r\n",
    b" a\r\n",
    b"a \r\n",
    b"\r\n",
    b"g\r\n",
    b"1" + b"0" * 16 + b"\r\n",
    b"5;ext\nhello\r\n",
    b"5;e\rxt\r\nhello\r\n",
    b"5;\r\nhello\r\n",
    b"5;e=\"unterminated\r\nhello\r\n",
    b"5\nhello\r\n0\r\n\r\n",
    b"5\r\nhello\n0\r\n\r\n",
    b"5\r\nhelloX\r\n0\r\n\r\n",
    b"5\r\nhello\r0\r\n\r\n",
    b"0\r\nbad trailer\r\n\r\n",
    b"0\r\nX : 1\r\n\r\n",
    b"0\r\n folded\r\n\r\n",
    b"0\r\nX: 1\n\r\n",
    b"0\r\nX: a\x00\r\n\r\n",
    b"1" * 5000,
]


def test_chunked_rejections():
    for body in CHUNKED_REJECTIONS:
        reject_body(ChunkedReader, body)
        reject_body(lambda: ChunkedReader(decode=True), body)


def test_chunked_trailer_limits():
    limits = HeadLimits(max_header_bytes=64, max_header_fields=2)
    reject_body(lambda: ChunkedReader(limits=limits), b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    reject_body(lambda: ChunkedReader(limits=limits), b"0\r\nA: " + b"x" * 80)
    body = b"0\r\nA: 1\r\nB: 2\r\n\r\n"
    assert read_body(lambda: ChunkedReader(limits=limits), body) == (body, True, b"")


def test_length_reader():
    assert read_body(lambda: LengthReader(5), b"hello") == (b"hello", True, b"")
    assert read_body(lambda: LengthReader(5), b"helloGET /") == (b"hello", True, b"GET /")
    reader = LengthReader(5)
    assert reader.feed(b"hel") == (b"hel", False, b"")
    assert reader.feed(b"lo!") == (b"lo", True, b"!")


def test_until_close_reader_never_completes():
    reader = UntilCloseReader()
    assert reader.feed(b"abc") == (b"abc", False, b"")
    assert reader.feed(b"") == (b"", False, b"")


def test_body_reader_per_framing():
    assert body_reader(NO_BODY) is None
    assert isinstance(body_reader(Length(3)), LengthReader)
    assert isinstance(body_reader(UNTIL_CLOSE), UntilCloseReader)
    decoding = body_reader(CHUNKED, decode_chunked=True)
    assert decoding.feed(b"1\r\na\r\n0\r\n\r\n") == (b"a", True, b"")
    raw = body_reader(CHUNKED)
    assert raw.feed(b"1\r\na\r\n0\r\n\r\n") == (b"1\r\na\r\n0\r\n\r\n", True, b"")


# Hop-by-hop and serialisation ----------------------------------------------


def test_strip_hop_by_hop():
    headers = (
        (b"Host", b"h"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"connection", b"x-other"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic Zm9v"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"x-secret", b"1"),
        (b"X-Other", b"2"),
        (b"Accept", b"*/*"),
    )
    assert strip_hop_by_hop(headers) == ((b"Host", b"h"), (b"Accept", b"*/*"))
    end_to_end = {b"host", b"accept", b"x-secret", b"x-other"}
    assert {name.lower() for name, _ in headers} - end_to_end == HOP_BY_HOP


def test_connection_cannot_strip_host_or_content_length():
    headers = (
        (b"Host", b"h"),
        (b"Content-Length", b"3"),
        (b"Connection", b"host, content-length"),
    )
    assert strip_hop_by_hop(headers) == ((b"Host", b"h"), (b"Content-Length", b"3"))


def test_serialize_request_round_trip():
    headers = ((b"Host", b"example.com"), (b"X-Empty", b""), (b"Accept", b"a, b"))
    wire = serialize_request_head("POST", "/p?q=1", headers)
    assert wire == (
        b"POST /p?q=1 HTTP/1.1\r\nHost: example.com\r\nX-Empty: \r\nAccept: a, b\r\n\r\n"
    )
    head, leftover = request(wire)
    assert (head.method, head.target, head.version) == ("POST", "/p?q=1", (1, 1))
    assert head.headers == headers
    assert leftover == b""


def test_serialize_response_round_trip():
    headers = ((b"Content-Length", b"2"), (b"Server", b"s"))
    wire = serialize_response_head((1, 0), 200, b"OK", headers)
    assert wire == b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nServer: s\r\n\r\n"
    head, _ = response(wire)
    assert (head.version, head.status, head.reason, head.headers) == ((1, 0), 200, b"OK", headers)
    assert serialize_response_head((1, 1), 204, b"", ()) == b"HTTP/1.1 204 \r\n\r\n"


@pytest.mark.parametrize(
    "headers", [((b"X", b"a\r\nInjected: 1"),), ((b"X", b"a\rb"),), ((b"X\n", b"a"),)]
)
def test_serialize_refuses_line_breaks(headers):
    with pytest.raises(ValueError):
        serialize_request_head("GET", "/", headers)
    with pytest.raises(ValueError):
        serialize_response_head((1, 1), 200, b"OK", headers)


# Fuzzing -------------------------------------------------------------------

VALID_REQUEST = (
    b"POST http://example.com:8080/a?b HTTP/1.1\r\nHost: example.com:8080\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    b"5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n"
)
FUZZ_LIMITS = HeadLimits(max_request_line_bytes=128, max_header_bytes=512, max_header_fields=8)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, byte in edits:
        where %= len(buf) + 1
        if kind == 0:
            buf.insert(where, byte)
        elif kind == 1 and where < len(buf):
            del buf[where]
        elif where < len(buf):
            buf[where] = byte
    return bytes(buf)


interesting = st.sampled_from(b"\r\n :;\t\x00/0aA@,\"\\").map(int) | st.integers(0, 255)
edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 400), interesting), max_size=6)
payloads = st.binary(max_size=700) | edits.map(lambda e: _mutate(VALID_REQUEST, e))
cuts = st.lists(st.integers(0, 1000), max_size=12)


def _drive_head(parser, pieces: list[bytes]) -> tuple[list, bool]:
    """
    Feed C{pieces}, re-feeding each leftover; return the heads parsed and
    whether a L{ProtocolError} ended it.  Nothing else may escape and the
    parser never holds more than one head's worth of bytes.
    """
    heads = []
    try:
        for piece in pieces:
            while piece:
                result = parser.feed(piece)
                assert parser.buffered <= FUZZ_LIMITS.max_header_bytes
                if result is None:
                    break
                heads.append(result[0])
                piece = result[1]
    except ProtocolError:
        return heads, True
    return heads, False


@fuzz_settings(300)
@given(payloads, cuts)
def test_fuzz_request_parser(data, cut):
    whole = _drive_head(RequestHeadParser(FUZZ_LIMITS), [data])
    assert _drive_head(RequestHeadParser(FUZZ_LIMITS), _split(data, cut)) == whole


@fuzz_settings(300)
@given(payloads, cuts, st.sampled_from(["GET", "HEAD", "CONNECT"]))
def test_fuzz_response_parser(data, cut, method):
    data = data.replace(b"POST http://example.com:8080/a?b", b"HTTP/1.1 200", 1)
    whole = _drive_head(ResponseHeadParser(method, FUZZ_LIMITS), [data])
    assert _drive_head(ResponseHeadParser(method, FUZZ_LIMITS), _split(data, cut)) == whole


@fuzz_settings(300)
@given(payloads, cuts, st.booleans())
def test_fuzz_chunked_reader(data, cut, decode):
    body = data.partition(b"\r\n\r\n")[2] or data
    reader = ChunkedReader(decode=decode, limits=FUZZ_LIMITS)
    try:
        for piece in _split(body, cut):
            forwarded, done, leftover = reader.feed(piece)
            assert reader.buffered <= FUZZ_LIMITS.max_header_bytes
            if done:
                break
    except ProtocolError:
        pass


extensions = st.sampled_from([b"", b";a", b" ; a = b", b';q="x\\"y"', b";a=1;b"])
trailers = st.lists(st.sampled_from([b"X: 1", b"Y-Z:", b"T:\tv a l\t"]), max_size=3)


@fuzz_settings(200)
@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=40), extensions), max_size=5),
    trailers,
    cuts,
)
def test_chunked_round_trip(chunks, trailer, cut):
    wire = b"".join(b"%x%s\r\n%s\r\n" % (len(d), e, d) for d, e in chunks)
    wire += b"0\r\n" + b"".join(t + b"\r\n" for t in trailer) + b"\r\n"
    for decode, expected in ((False, wire), (True, b"".join(d for d, _ in chunks))):
        reader = ChunkedReader(decode=decode)
        pieces = _split(wire + b"NEXT", cut)
        forwarded, rest = [], b""
        for index, piece in enumerate(pieces):
            out, done, leftover = reader.feed(piece)
            forwarded.append(out)
            if done:
                rest = leftover + b"".join(pieces[index + 1 :])
                break
        assert (b"".join(forwarded), done, rest) == (expected, True, b"NEXT")


_FIELD_BYTES = st.sampled_from(b" :;\t\x00\x7f\x80\xff/0aA@,-\"").map(int) | st.integers(0, 255).filter(
    lambda byte: byte not in b"\r\n"
)
_FIELD_LINES = st.sampled_from(
    [b"Host: a.test", b"X-Long-Name:  v a l \t", b"Y:", b'ETag: "x"', b"Accept: */*"]
)
_field_line = _FIELD_LINES | st.tuples(
    _FIELD_LINES, st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), _FIELD_BYTES), max_size=3)
).map(lambda edit: _mutate(*edit)).filter(bool)


@fuzz_settings(500)
@given(st.lists(_field_line, max_size=8))
def test_fuzz_a_field_block_reads_as_its_lines_one_by_one(lines):
    """
    The whole-block reading of header fields (one regular expression, a
    match per line) takes exactly what reading each line on its own takes,
    and refuses whatever that refuses.
    """
    from codex_proxy._httpbody import parse_field
    from codex_proxy._httpfields import parse_fields

    try:
        expected: object = [parse_field(line, 400) for line in lines]
    except ProtocolError as e:
        expected = e.message
    try:
        got: object = list(parse_fields(b"".join(line + b"\r\n" for line in lines), 400).headers)
    except ProtocolError as e:
        got = e.message
    assert got == expected


_REQUEST_LINES = st.builds(
    lambda method, target, version: b" ".join([method, target, version]),
    st.sampled_from([b"GET", b"CONNECT", b"FOO-BAR", b"G(T", b""]),
    st.sampled_from([b"http://a.test/x", b"a.test:443", b"*", b"/\x7f", b""]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/1.10", b"http/1.1"]),
)
_request_line = _REQUEST_LINES | st.tuples(
    _REQUEST_LINES, st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), _FIELD_BYTES), max_size=3)
).map(lambda edit: _mutate(*edit))


@fuzz_settings(500)
@given(_request_line)
def test_fuzz_the_common_request_line_reads_as_the_line_by_line_reading(line):
    """
    The one-expression reading of a request line takes what the reading
    part by part takes (method, target, version), and no more.
    """
    from codex_proxy._httphead import _REQUEST_LINE, _request_line

    try:
        expected: object = _request_line(line)
    except ProtocolError as e:
        expected = e.message
    match = _REQUEST_LINE.fullmatch(line)
    if match is not None:
        assert (match[1], match[2], (1, int(match[3]))) == expected


_RESPONSE_FIELDS = st.sampled_from(
    [
        b"Server: nginx",
        b"content-length:  5 ",
        b"Connection: keep-alive",
        b"connection: close, X-Drop",
        b"CONNECTION:\tUpgrade",
        b"Keep-Alive: timeout=5",
        b"TE: trailers",
        b"Tel: 1",
        b"X-Drop: gone",
        b"Upgrade: websocket",
        b"Proxy-Authenticate: Basic",
        b"ETag:  \"x\"\t",
        b"Set-Cookie: a=1; b",
        b"Trailer: X",
        b"X-Note: see te: trailers",
        b"Via: 1.1 keep-alive:x",
    ]
)


@fuzz_settings(500)
@given(
    st.lists(_RESPONSE_FIELDS, max_size=8),
    st.sampled_from([(), ((b"Connection", b"close"),), ((b"Transfer-Encoding", b"chunked"),)]),
)
def test_fuzz_a_response_head_forwarded_as_received_reads_as_one_encoded_again(lines, added):
    """
    Forwarding the field lines as received, less the hop-by-hop ones, gives
    the client the fields that encoding them again would: the same names
    and values in the same order (spacing around values aside).
    """
    from codex_proxy._httptarget import (
        forwarded_response_head,
        serialize_response_head,
        strip_hop_by_hop,
    )

    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    try:
        head, _ = ResponseHeadParser("HEAD").feed(raw)
    except ProtocolError:
        return  # two Content-Lengths, say: nothing is forwarded
    as_received = forwarded_response_head(head, added)
    encoded = serialize_response_head((1, 1), 200, b"OK", strip_hop_by_hop(head.headers) + added)
    from codex_proxy._httpfields import parse_fields

    reread = [parse_fields(h[h.index(b"\r\n") + 2 : -2], 502).headers for h in (as_received, encoded)]
    assert reread[0] == reread[1]
    assert as_received.startswith(b"HTTP/1.1 200 OK\r\n")
    named = any(b"X-Drop" in line for line in lines if line.lower().startswith(b"connection"))
    present = any(line.startswith(b"X-Drop:") for line in lines)
    assert (head.block is None) == (named and present)


def test_nginx_response_fields_go_as_received_less_their_connection_line():
    from codex_proxy._httptarget import forwarded_response_head

    head, _ = ResponseHeadParser("GET").feed(
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length:  2\r\nConnection: keep-alive\r\n"
        b'ETag: "x"\r\n\r\nok'
    )
    assert forwarded_response_head(head, ((b"Connection", b"close"),)) == (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length:  2\r\n"
        b'ETag: "x"\r\nConnection: close\r\n\r\n'
    )
