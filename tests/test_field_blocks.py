"""
Field blocks forwarded as received, and read once per connection while they
repeat: a request's field lines go on as the client wrote them, less the
hop-by-hop ones; a parser that meets the block of its last head again reads
it as a fresh parser would.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from codex_proxy._httphead import RequestHeadParser, ResponseHeadParser
from codex_proxy.errors import ProtocolError
from support.fuzzing import fuzz_settings
from support.http import Harness


def _forwarded(request: bytes) -> bytes:
    h = Harness(False)
    h.send(request)
    server, upstream = h.accept()
    return upstream.value()


def test_request_fields_go_as_received_less_the_hop_by_hop_lines():
    sent = _forwarded(
        b"GET http://origin.test/p HTTP/1.1\r\nHost:origin.test\r\nProxy-Connection: keep-alive\r\n"
        b"User-Agent:   spaced out \t\r\nkeep-alive: 5\r\nAccept: */*\r\n\r\n"
    )
    assert sent.startswith(
        b"GET /p HTTP/1.1\r\nHost:origin.test\r\nUser-Agent:   spaced out \t\r\nAccept: */*\r\nVia: 1.1 codex-proxy-"
    )
    assert sent.endswith(b"\r\n\r\n") and sent.count(b"\r\n") == 6


def test_a_field_a_connection_option_names_is_dropped_and_the_rest_encoded_again():
    sent = _forwarded(
        b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nConnection: X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\nUser-Agent:   spaced\r\n\r\n"
    )
    assert b"x-secret-hop" not in sent.lower()
    assert b"\r\nUser-Agent: spaced\r\n" in sent


def test_connection_options_that_name_no_field_keep_the_fields_as_received():
    sent = _forwarded(
        b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nConnection: close, X-Absent\r\n"
        b"User-Agent:   spaced\r\n\r\n"
    )
    assert sent.startswith(b"GET / HTTP/1.1\r\nHost: origin.test\r\nUser-Agent:   spaced\r\nVia: ")
    # The client's close is its own hop's: the destination's connection may
    # be parked for later requests.
    assert b"connection:" not in sent.lower()


def test_a_chunked_request_keeps_its_framing_with_fields_as_received():
    sent = _forwarded(
        b"POST http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nTransfer-Encoding: chunked\r\n"
        b"X-A:  1\r\n\r\n"
    )
    head = sent.partition(b"\r\n\r\n")[0]
    assert head.split(b"\r\n")[1:3] == [b"Host: origin.test", b"X-A:  1"]
    assert head.count(b"Transfer-Encoding: chunked") == 1


def _heads(parser, heads: list[bytes]) -> list[object]:
    """
    What C{parser} makes of C{heads} fed one after another: each head (with
    what forwarding and the policy read of it), or the error it raised.
    """
    read: list[object] = []
    for raw in heads:
        try:
            result = parser.feed(raw)
        except ProtocolError as e:
            read.append(("error", e.status, e.message))
            continue
        assert result is not None and result[1] == b""
        head = result[0]
        names = (b"host", b"connection", b"x-b", b"upgrade", b"via")
        read.append((head, head.block, [head.header(n) for n in names]))
    return read


_BLOCKS = st.sampled_from(
    [
        b"Host: a.test\r\n",
        b"Host: a.test\r\nConnection: close\r\n",
        b"Host: b.test\r\nConnection: keep-alive, X-B\r\nX-B: 1\r\nContent-Length: 0\r\n",
        b"host:  a.test \r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        b"Host: a.test\r\nHost: b.test\r\n",
        b"Host: a.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n",
        b"Host: a.test\r\nTransfer-Encoding: chunked\r\nVia: 1.1 other\r\n",
        b"",
    ]
)


@fuzz_settings(300)
@given(
    st.lists(
        st.tuples(st.sampled_from([b"GET http://a.test/ HTTP/1.1", b"HEAD / HTTP/1.0", b"OPTIONS * HTTP/1.1"]), _BLOCKS),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_a_request_parser_reads_a_repeated_block_as_a_fresh_one_would(heads):
    raw = [line + b"\r\n" + block + b"\r\n" for line, block in heads]
    assert _heads(RequestHeadParser(), raw) == [_heads(RequestHeadParser(), [one])[0] for one in raw]


@fuzz_settings(300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["GET", "HEAD", "CONNECT"]),
            st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 204 No Content", b"HTTP/1.1 101 Switching"]),
            _BLOCKS,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_a_response_parser_reads_a_repeated_block_as_a_fresh_one_would(heads):
    one = ResponseHeadParser("GET")
    got, expected = [], []
    for method, line, block in heads:
        raw = line + b"\r\n" + block + b"\r\n"
        one.answering(method)
        got += _heads(one, [raw])
        expected += _heads(ResponseHeadParser(method), [raw])
    assert got == expected


def test_repeated_request_fields_are_read_once():
    parser = RequestHeadParser()
    first = parser.feed(b"GET http://a.test/1 HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n")
    second = parser.feed(b"GET http://a.test/2 HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n")
    assert first is not None and second is not None
    assert second[0].path == "/2"
    assert second[0].headers is first[0].headers


def test_a_kept_connection_frames_each_response_by_its_own_request_method(trickle):
    """
    The same response fields, read once on the kept destination connection,
    still frame the answer to a HEAD (no body) unlike the answer to a GET.
    """
    h = Harness(trickle)
    fields = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    server, upstream = h.accept()
    h.answer(server, fields + b"hello")
    assert h.response()[2] == b"hello"
    h.client.clear()
    h.send(b"HEAD http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    h.answer(server, fields)
    assert h.client.value() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    h.client.clear()
    h.send(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert len(h.dials()) == 1
    h.answer(server, fields + b"again")
    assert h.response()[2] == b"again"


_AUTHORITIES = st.sampled_from(
    ["a.test", "a.test:8080", "[::1]:443", "A.Test.", "a@b.test", "a.test:0", "a.test:99999", ":80", "", "a b"]
) | st.builds(lambda host, dots, port: host + "." * dots + port, st.sampled_from(["a.test", "x"]),
             st.integers(0, 400), st.sampled_from(["", ":80"]))


@fuzz_settings(300)
@given(st.lists(st.tuples(_AUTHORITIES, st.booleans()), min_size=1, max_size=4))
def test_fuzz_cached_authority_readings_are_the_uncached_ones(calls):
    """
    The authority grammar is read once per authority: a repeated target or
    C{Host} gets what reading it again would, errors included, long or short.
    """
    from codex_proxy._httpform import split_authority
    from codex_proxy._httptarget import split_host_header

    def outcome(function, *args):
        try:
            return function(*args)
        except ProtocolError as e:
            return ("error", e.status, e.message)

    for text, required in calls + calls:
        assert outcome(split_authority, text, required) == outcome(split_authority.__wrapped__, text, required)
        value = text.encode()
        assert outcome(split_host_header, value, 80) == outcome(split_host_header.__wrapped__, value, 80)


def test_an_opaque_tunnel_lets_go_of_its_heads_reading():
    """
    The reading kept for the next head is memory an idle tunnel would hold
    for its life (issue 16's bound is 8 KiB a tunnel): a connection that
    became an opaque tunnel reads no more heads and keeps none. Without
    forgetting, the CONNECT's fields stay reachable from the connection.
    """
    import gc

    from codex_proxy._httpfields import Fields

    h = Harness(False)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\nUser-Agent: kept?\r\n\r\n")
    h.accept()
    assert h.client.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    reachable = gc.get_referents(*gc.get_referents(h.proto))
    assert not [o for o in reachable if isinstance(o, Fields)]


def test_a_large_block_is_read_each_time_and_not_kept():
    """
    What a connection keeps between requests stays small: a block past
    KEPT_BLOCK (heads may be 64 KiB) is read afresh and let go of.
    """
    from codex_proxy._httphead import KEPT_BLOCK

    parser = RequestHeadParser()
    big = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nCookie: " + b"c" * KEPT_BLOCK + b"\r\n\r\n"
    first = parser.feed(big)
    second = parser.feed(big)
    assert first is not None and second is not None
    assert second[0] == first[0] and second[0].headers is not first[0].headers
    assert second[0].header(b"cookie") == b"c" * KEPT_BLOCK
    assert parser._last is None



def _small_limits():
    from codex_proxy._httpbody import HeadLimits

    return HeadLimits(max_request_line_bytes=40, max_header_bytes=160, max_header_fields=3)


_START_LINES = st.sampled_from(
    [
        b"GET http://a.test/ HTTP/1.1",
        b"GET / HTTP/1.0",
        b"GET /" + b"x" * 35 + b" HTTP/1.1",  # over the 40-byte line limit
        b"GET /\rx HTTP/1.1",
        b"GET /\nx HTTP/1.1",
        b"\r\nGET / HTTP/1.1",
        b"",
        b"GET  / HTTP/1.1",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 O\rK",
    ]
)
_LIMIT_BLOCKS = _BLOCKS | st.sampled_from(
    [
        b"Host: a.test\r\nA: 1\r\nB: 2\r\nC: 3\r\n",  # a field over the limit
        b"Host: a.test\r\nX-Long: " + b"v" * 100 + b"\r\n",  # a head over 160 bytes
    ]
)


@fuzz_settings(500)
@given(
    _LIMIT_BLOCKS,
    st.lists(
        st.tuples(
            _START_LINES,
            st.none() | _LIMIT_BLOCKS,  # None: the block most heads share
            st.sampled_from([b"", b"", b"", b"GET", b"\r\n", b"rest"]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
def test_fuzz_heads_that_repeat_the_last_block_read_as_on_a_fresh_parser(shared, heads, responses):
    """
    Heads fed whole, one after another, to one parser (which keeps the
    reading of the last block) read as each would on a fresh parser: the
    same head, error or leftover, under tight limits, with start lines that
    are too long, empty, or carry a bare CR or LF. The sequence stops at the
    first error, as a connection does.
    """

    def make():
        if responses:
            return ResponseHeadParser("GET", _small_limits())
        return RequestHeadParser(_small_limits())

    def read(parser, raw):
        try:
            result = parser.feed(raw)
        except ProtocolError as e:
            return ("error", e.status, e.message)
        if result is None:
            return None
        head, rest = result
        return (head, head.block, head.header(b"host"), rest)

    one = make()
    for start, block, rest in heads:
        raw = start + b"\r\n" + (shared if block is None else block) + b"\r\n" + rest
        got, expected = read(one, raw), read(make(), raw)
        assert got == expected, raw
        if got is None or got[0] == "error" or got[3]:
            break  # an error, an incomplete head, or bytes of the next message


def test_a_repeated_block_still_meets_the_start_line_and_head_limits():
    """
    A head whose block repeats the last one is held to the limits like any:
    a start line over its limit is 414, a head that the longer start line
    takes over its size is 431, as on a fresh parser.
    """
    block = b"Host: a.test\r\nX-Pad: " + b"p" * 100 + b"\r\n"  # 123 bytes: 141 with a 14-byte line

    def after_a_first_head(start: bytes) -> tuple[int, str]:
        parser = RequestHeadParser(_small_limits())
        assert parser.feed(b"GET / HTTP/1.1\r\n" + block + b"\r\n") is not None
        try:
            parser.feed(start + b"\r\n" + block + b"\r\n")
        except ProtocolError as e:
            return e.status, e.message
        raise AssertionError("accepted")

    assert after_a_first_head(b"GET /" + b"x" * 40 + b" HTTP/1.1") == (414, "start line too long")
    assert after_a_first_head(b"GET /" + b"x" * 20 + b" HTTP/1.1") == (431, "message head too large")


def test_a_repeated_block_without_the_blank_line_is_no_head_yet():
    parser = RequestHeadParser()
    block = b"Host: a.test\r\nAccept: */*\r\n"
    assert parser.feed(b"GET /1 HTTP/1.1\r\n" + block + b"\r\n") is not None
    assert parser.feed(b"GET /2 HTTP/1.1\r\n" + block) is None
    second = parser.feed(b"\r\nGET")
    assert second is not None and second[0].path == "/2" and second[1] == b"GET"
    with_more = parser.feed(second[1] + b" /3 HTTP/1.1\r\n" + block + b"X-More: 1\r\n\r\n")
    assert with_more is not None and with_more[0].header(b"x-more") == b"1"


def test_the_authority_caches_keep_only_authorities_as_short_as_a_host_name():
    """
    A client choosing long (valid) authorities or Host values cannot grow
    what the caches hold: past 262 characters nothing is kept; a short one
    is kept once however often it comes.
    """
    from codex_proxy._httpform import split_authority
    from codex_proxy._httptarget import split_host_header

    long_host = "a" * 300
    for function, args in ((split_authority, (long_host, False)), (split_host_header, (long_host.encode(), 80))):
        before = function.cache_info().currsize
        try:
            function(*args)
        except ProtocolError:
            pass
        assert function.cache_info().currsize == before
    before = split_authority.cache_info().currsize
    for _ in range(3):
        assert split_authority("kept-once.test:8443", True) == ("kept-once.test", 8443)
    assert split_authority.cache_info().currsize == before + 1
