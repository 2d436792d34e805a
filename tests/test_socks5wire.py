"""
The sans-IO SOCKS5 messages: every complete message parses whole and from
any prefix (a prefix is incomplete, never an error), bad bytes raise our
protocol error with the right REP code, and random bytes never raise
anything else nor leave a full-size buffer unparsed.
"""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from codex_proxy import _socks5wire as wire
from codex_proxy.errors import (
    SOCKS_ADDRESS_TYPE_NOT_SUPPORTED,
    SOCKS_GENERAL_FAILURE,
    ProtocolError,
)
from support.fuzzing import fuzz_settings


def _prefixes_incomplete(parse, data: bytes) -> None:
    for i in range(len(data)):
        assert parse(data[:i]) is None, data[:i]


@pytest.mark.parametrize(
    "data, methods",
    [
        (b"\x05\x01\x00", {0}),
        (b"\x05\x02\x00\x02", {0, 2}),
        (b"\x05\x03\x01\x80\xfe", {1, 0x80, 0xFE}),
    ],
)
def test_greeting(data, methods):
    _prefixes_incomplete(wire.parse_greeting, data)
    greeting, rest = wire.parse_greeting(data + b"more")
    assert greeting.methods == methods
    assert rest == b"more"


@pytest.mark.parametrize("data", [b"\x04\x01\x00", b"\x05\x00", b"GET / HTTP/1.1\r\n"])
def test_bad_greeting(data):
    with pytest.raises(wire.SocksProtocolError):
        wire.parse_greeting(data)


def test_auth_keeps_username_and_hides_password():
    data = b"\x01\x05alice\x06s3cret"
    _prefixes_incomplete(wire.parse_auth, data)
    credentials, rest = wire.parse_auth(data)
    assert (credentials.username, credentials.password, rest) == ("alice", b"s3cret", b"")
    assert "s3cret" not in repr(credentials)


@pytest.mark.parametrize("data", [b"\x05\x01a\x00", b"\x01\x02\xff\xfe\x00"])
def test_bad_auth(data):
    with pytest.raises(wire.SocksProtocolError):
        wire.parse_auth(data)


@pytest.mark.parametrize(
    "data, request_",
    [
        (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50", wire.Request(1, "127.0.0.1", 80)),
        (
            b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x01\xbb",
            wire.Request(1, "::1", 443),
        ),
        (b"\x05\x03\x00\x03\x0bexample.com\x00\x35", wire.Request(3, "example.com", 53)),
        (b"\x05\x01\x00\x03\x00\x00\x50", wire.Request(1, "", 80)),
        (
            b"\x05\x01\x00\x03\x0cb\xc3\xbccher.test\x00\x50",
            wire.Request(1, "b\u00fccher.test", 80),
        ),
    ],
)
def test_request(data, request_):
    _prefixes_incomplete(wire.parse_request, data)
    assert wire.parse_request(data + b"x") == (request_, b"x")


@pytest.mark.parametrize(
    "data, reply",
    [
        (b"\x05\x01\x00\x02\x00", SOCKS_ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x05", SOCKS_ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x04\x01", SOCKS_GENERAL_FAILURE),
        (b"\x05\x01\x01\x01", SOCKS_GENERAL_FAILURE),
        (b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", SOCKS_GENERAL_FAILURE),
    ],
)
def test_bad_request(data, reply):
    with pytest.raises(wire.SocksProtocolError) as caught:
        wire.parse_request(data)
    assert caught.value.reply == reply


def test_datagram_round_trip():
    data = wire.encode_datagram("2001:db8::1", 53, b"query")
    assert data == b"\x00\x00\x00\x04" + bytes.fromhex("20010db8" + "00" * 11 + "01") + b"\x00\x35query"
    assert wire.parse_datagram(data) == wire.Datagram(0, "2001:db8::1", 53, b"query")
    named = b"\x00\x00\x01\x03\x04a.te\x01\x00"
    assert wire.parse_datagram(named) == wire.Datagram(1, "a.te", 256, b"")


@pytest.mark.parametrize(
    "data", [b"", b"\x00\x00\x00", b"\x01\x00\x00\x01\x7f\x00\x00\x01\x00\x35", b"\x00\x00\x00\x01\x7f\x00"]
)
def test_bad_datagram(data):
    with pytest.raises(ProtocolError):
        wire.parse_datagram(data)


def test_replies():
    assert wire.encode_method(wire.METHOD_NO_ACCEPTABLE) == b"\x05\xff"
    assert wire.encode_auth_status(True) == b"\x01\x00"
    assert wire.encode_auth_status(False) == b"\x01\x01"
    assert wire.encode_reply(2) == b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
    assert wire.encode_reply(0, "127.0.0.1", 1080) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"


_PARSERS = [
    (wire.parse_greeting, wire.MAX_GREETING),
    (wire.parse_auth, wire.MAX_AUTH),
    (wire.parse_request, wire.MAX_REQUEST),
]


@fuzz_settings(400)
@given(st.binary(max_size=600), st.sampled_from(range(len(_PARSERS))))
def test_random_bytes_only_raise_protocol_errors(data, which):
    parse, limit = _PARSERS[which]
    try:
        result = parse(data)
    except ProtocolError:
        return
    if result is None:
        # Incomplete is only possible below the message's maximum size.
        assert len(data) < limit
    else:
        assert len(result[1]) < len(data)


@fuzz_settings(400)
@given(st.binary(max_size=300))
def test_random_datagrams_only_raise_protocol_errors(data):
    try:
        datagram = wire.parse_datagram(data)
    except ProtocolError:
        return
    assert len(datagram.payload) < len(data)


@fuzz_settings(200)
@given(
    st.one_of(st.just(b"\x05\x01\x00"), st.just(b"\x05\x01\x00\x03")),
    st.binary(max_size=300),
)
def test_random_request_tails_only_raise_protocol_errors(head, tail):
    # Random bytes after a plausible start reach the address parsers.
    try:
        result = wire.parse_request(head + tail)
    except ProtocolError:
        return
    assert result is None or result[0].port >= 0
