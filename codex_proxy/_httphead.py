"""
A strict sans-IO parser for HTTP/1.x message heads (RFC 9112); the bodies
that follow are delimited by L{codex_proxy._httpbody}.

The HTTP listener feeds bytes in and gets back frozen heads and leftovers;
their field blocks are read by L{codex_proxy._httpfields}. Every shape that
two implementations could read differently (the raw material of request
smuggling) is a L{ProtocolError}, so the proxy never forwards it. Errors from
L{ResponseHeadParser} carry status 502: that is what the proxy answers its
client when an upstream breaks the wire format.
"""

from __future__ import annotations

import re

import attrs

from codex_proxy._httpbody import (
    NO_BODY,
    TOKEN,
    UNTIL_CLOSE,
    Framing,
    HeadLimits,
)
from codex_proxy._httpfields import (
    Fields,
    Headers,
    Watched,
    first_value,
    keep_alive,
    parse_fields,
    watched_fields,
)
from codex_proxy._httpform import Form, target_form
from codex_proxy.errors import ProtocolError

_TARGET = re.compile(rb"[\x21-\x7e]+")
# The common request line whole: a method token, a visible target, HTTP/1.0
# or HTTP/1.1, single spaces (anything else is read by _request_line).
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.([01])")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_STATUS_LINE = re.compile(
    rb"HTTP/([0-9])\.([0-9]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?"
)
# Heads are values, never changed once parsed (L{RequestHead.with_headers}
# and C{attrs.evolve} make changed copies), but not frozen: a frozen attrs
# class sets each field through object.__setattr__, which cost 0.8 us per
# request head (sixteen fields), one of every head parsed.
@attrs.define
class RequestHead:
    """
    A parsed, validated request head.

    @ivar form: C{"absolute"}, C{"authority"}, C{"origin"} or C{"asterisk"}.
    @ivar scheme: the lower-cased scheme of an absolute-form target.
    @ivar host: the host of an absolute- or authority-form target as written
        (IPv6 keeps its brackets).
    @ivar port: the explicit port, else the scheme's default, else C{None}.
    @ivar path: path and query of an absolute-form target (C{"/"} when
        empty, fragment dropped), the target of an origin-form one, else
        C{""}.
    @ivar keep_alive: the client lets the connection carry another request.
    @ivar upgrade: an C{Upgrade} header is present.
    @ivar expect_continue: an HTTP/1.1 client waits for C{100 Continue}.
    @ivar block: the field lines to forward (L{codex_proxy._httpfields.forwardable}); C{None} once
        L{with_headers} changed the fields.
    @ivar watched: the values of the fields the proxy acts on, by name.
    """

    method: str
    target: str
    version: tuple[int, int]
    headers: Headers
    form: Form
    scheme: str | None
    host: str | None
    port: int | None
    path: str
    framing: Framing
    keep_alive: bool
    upgrade: bool
    expect_continue: bool
    block: bytes | None
    watched: Watched = attrs.field(eq=False, repr=False)

    def header(self, name: bytes) -> bytes | None:
        """
        The first value of the field C{name} (case-insensitive), or C{None}.
        """
        return first_value(self.headers, self.watched, name)

    def with_headers(self, headers: Headers) -> RequestHead:
        """
        This head with other fields (same framing and routing): they are
        encoded again when forwarded.
        """
        return attrs.evolve(self, headers=headers, block=None, watched=watched_fields(headers)[0])


@attrs.define
class ResponseHead:
    """
    A parsed, validated response head.

    @ivar framing: how the body that follows is delimited, given the
        request method the response answers.
    @ivar keep_alive: the server lets the connection carry another request.
    @ivar block: the field lines to forward (L{codex_proxy._httpfields.forwardable}).
    @ivar watched: the values of the fields the proxy acts on, by name.
    """

    version: tuple[int, int]
    status: int
    reason: bytes
    headers: Headers
    framing: Framing
    keep_alive: bool
    block: bytes | None
    watched: Watched = attrs.field(eq=False, repr=False)

    def header(self, name: bytes) -> bytes | None:
        """
        The first value of the field C{name} (case-insensitive), or C{None}.
        """
        return first_value(self.headers, self.watched, name)


def _split_head(head: bytes, status: int) -> tuple[bytes, bytes]:
    """
    The start line and the field block (its lines each with their CRLF) of
    a complete head (which ends with an empty line).
    """
    # Every LF was checked to follow a CR while scanning, so an excess CR is
    # a bare one.
    if head.count(b"\r") != head.count(b"\n"):
        raise ProtocolError("bare CR in the message head", status)
    end = head.index(b"\r\n")
    return head[:end], head[end + 2 : -2]


def _whole_head(data: bytes, limits: HeadLimits) -> tuple[bytes, bytes] | None:
    """
    (head, leftover) when C{data} holds a whole head, from its first byte,
    that the line-by-line scan would take (every LF after a CR, the start
    line, the field count and the size within C{limits}); C{None} for
    anything else, which that scan then reads and names what is wrong with.
    The common case: a head that arrives in one read.
    """
    end = data.find(b"\r\n\r\n") + 4
    if end < 4 or end > limits.max_header_bytes or data[:1] in (b"\r", b"\n"):
        return None
    head = data[:end] if end < len(data) else data
    lines = head.count(b"\n")
    if (
        head.count(b"\r\n") != lines
        or head.index(b"\r\n") > limits.max_request_line_bytes
        or lines - 2 > limits.max_header_fields
    ):
        return None
    return head, data[end:]


#: The largest field block a parser keeps read for the next head (typical
#: heads are well under 2 KiB).
KEPT_BLOCK = 8192


class _HeadParser:
    """
    Accumulate bytes until a blank line ends a head, enforcing the limits as
    bytes arrive.  Each new byte is scanned once.

    The field block of the last head is kept read (up to L{KEPT_BLOCK}
    bytes): a client repeats its fields from one request to the next on a
    connection, and a block equal to the last one, byte for byte, reads the
    same.
    """

    _line_status: int
    _size_status: int
    _status: int
    _last: Fields | None = None

    def __init__(self, limits: HeadLimits) -> None:
        self._limits = limits
        self._reset()

    def forget(self) -> None:
        """
        Let go of the last block's reading: no head with it is coming (the
        connection has become an opaque tunnel), and it would hold memory
        for the connection's life.
        """
        self._last = None

    def _fields(self, block: bytes) -> Fields:
        """
        L{parse_fields} of C{block}, for the last block read again.
        """
        last = self._last
        if last is not None and last.raw == block:
            return last
        fields = parse_fields(block, self._status)
        # Kept only when small: an idle connection holds it, and a head may
        # be 64 KiB.
        self._last = fields if len(block) <= KEPT_BLOCK else None
        return fields

    def _reset(self) -> None:
        # Before the start line begins, _buf holds at most one CR.
        self._buf = bytearray()
        self._started = False
        self._scan = 0
        self._line_start = 0
        self._lines = 0

    @property
    def buffered(self) -> int:
        """
        Bytes held while waiting for the rest of a head.
        """
        return len(self._buf)

    def _skip_empty_lines(self, data: bytes) -> bytes:
        """
        Drop CRLFs before a start line (RFC 9112 §2.2); return what follows.
        """
        if data[:1] not in (b"\r", b"\n", b""):
            self._buf = bytearray()
            return data
        rest = data.lstrip(b"\r\n")
        pairs, odd = divmod(len(data) - len(rest), 2)
        if data[: pairs * 2] != b"\r\n" * pairs or (odd and (rest or data[-1] != 13)):
            raise ProtocolError("bare CR or LF before the start line", self._status)
        self._buf = bytearray(b"\r" if odd else b"")
        return rest

    def _take_head(self, data: bytes) -> tuple[bytes, bytes] | None:
        """
        Add C{data}; return (head, leftover) once a head is complete.
        """
        if not self._started and not self._buf and type(data) is bytes:
            whole = _whole_head(data, self._limits)
            if whole is not None:
                return whole
        if not self._started:
            data = self._skip_empty_lines(bytes(self._buf) + data if self._buf else data)
            if not data:
                return None
            self._started = True
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data
        limits = self._limits
        scan, line_start, lines = self._scan, self._line_start, self._lines
        while (lf := buf.find(b"\n", scan)) >= 0:
            if buf[lf - 1] != 13:
                raise ProtocolError("bare LF in the message head", self._status)
            length = lf - 1 - line_start
            if length == 0:
                end = lf + 1
                if end > limits.max_header_bytes:
                    raise ProtocolError("message head too large", self._size_status)
                head, leftover = bytes(buf[:end]), bytes(buf[end:])
                self._reset()
                return head, leftover
            if lines == 0:
                if length > limits.max_request_line_bytes:
                    raise ProtocolError("start line too long", self._line_status)
            elif lines > limits.max_header_fields:
                raise ProtocolError("too many header fields", self._size_status)
            lines += 1
            line_start = scan = lf + 1
        partial = len(buf) - line_start - (buf[-1] == 13)
        if lines == 0 and partial > limits.max_request_line_bytes:
            raise ProtocolError("start line too long", self._line_status)
        if len(buf) > limits.max_header_bytes:
            raise ProtocolError("message head too large", self._size_status)
        if buf is data:
            self._buf = bytearray(data)
        self._scan, self._line_start, self._lines = len(buf), line_start, lines
        return None


class RequestHeadParser(_HeadParser):
    """
    Parse request heads from a client byte stream, one after another.
    """

    _line_status = 414
    _size_status = 431
    _status = 400

    def __init__(self, limits: HeadLimits = HeadLimits()) -> None:
        super().__init__(limits)

    def feed(self, data: bytes) -> tuple[RequestHead, bytes] | None:
        """
        Accumulate C{data}; once a head is complete return it with the bytes
        after it, and start over for the next head.  C{None} while
        incomplete.

        @raise ProtocolError: the bytes are not a valid request head.
        """
        taken = self._take_head(data)
        if taken is None:
            return None
        head, leftover = taken
        return self._parse(head), leftover

    def _parse(self, head: bytes) -> RequestHead:
        """
        Validate a complete request head and decide its framing and form.
        """
        start, block = _split_head(head, 400)
        line = _REQUEST_LINE.fullmatch(start)
        if line is not None:
            raw_method, raw_target, version = line[1], line[2], (1, int(line[3]))
        else:
            raw_method, raw_target, version = _request_line(start)
        fields = self._fields(block)
        seen = fields.watched
        if len(seen.get(b"host", ())) > 1:
            raise ProtocolError("more than one Host", 400)
        framing = fields.framing(version, 400, 501) or NO_BODY
        method, target = raw_method.decode("ascii"), raw_target.decode("ascii")
        form, scheme, host, port, path = target_form(method, target)
        return RequestHead(
            method=method,
            target=target,
            version=version,
            headers=fields.headers,
            form=form,
            scheme=scheme,
            host=host,
            port=port,
            path=path,
            framing=framing,
            keep_alive=keep_alive(fields.connection, version),
            upgrade=b"upgrade" in seen,
            expect_continue=b"expect" in seen
            and version >= (1, 1)
            and any(v.lower() == b"100-continue" for v in seen[b"expect"]),
            block=fields.block,
            watched=seen,
        )


def _request_line(start: bytes) -> tuple[bytes, bytes, tuple[int, int]]:
    """
    Method, target and version of a request line that L{_REQUEST_LINE}
    does not match, or the L{ProtocolError} naming what is wrong with it.
    """
    parts = start.split(b" ")
    if len(parts) != 3:
        raise ProtocolError("malformed request line", 400)
    raw_method, raw_target, raw_version = parts
    if not TOKEN.fullmatch(raw_method):
        raise ProtocolError("invalid method", 400)
    if not _TARGET.fullmatch(raw_target):
        raise ProtocolError("invalid request target", 400)
    return raw_method, raw_target, _version(raw_version, 400, 505)


def _version(raw: bytes, status: int, unsupported_status: int) -> tuple[int, int]:
    """
    Parse C{HTTP/x.y}; only 1.0 and 1.1 are spoken.
    """
    match = _VERSION.fullmatch(raw)
    if match is None:
        raise ProtocolError("malformed HTTP version", status)
    version = (int(match[1]), int(match[2]))
    if version not in ((1, 0), (1, 1)):
        raise ProtocolError("unsupported HTTP version", unsupported_status)
    return version


class ResponseHeadParser(_HeadParser):
    """
    Parse response heads from an upstream byte stream for one request
    method (it decides whether a body follows).  Interim (1xx) responses
    come out one by one.
    """

    _line_status = 502
    _size_status = 502
    _status = 502

    def __init__(self, request_method: str, limits: HeadLimits = HeadLimits()) -> None:
        super().__init__(limits)
        self._request_method = request_method

    def answering(self, request_method: str) -> None:
        """
        The heads that follow answer a request of C{request_method}.
        """
        self._request_method = request_method

    def feed(self, data: bytes) -> tuple[ResponseHead, bytes] | None:
        """
        Accumulate C{data}; once a head is complete return it with the bytes
        after it, and start over for the next head.  C{None} while
        incomplete.

        @raise ProtocolError: (status 502) the bytes are not a valid
            response head.
        """
        taken = self._take_head(data)
        if taken is None:
            return None
        head, leftover = taken
        return self._parse(head), leftover

    def _parse(self, head: bytes) -> ResponseHead:
        """
        Validate a complete response head and decide its framing (RFC 9112
        §6.3).
        """
        start, block = _split_head(head, 502)
        match = _STATUS_LINE.fullmatch(start)
        if match is None:
            raise ProtocolError("malformed status line", 502)
        version = (int(match[1]), int(match[2]))
        if version not in ((1, 0), (1, 1)):
            raise ProtocolError("unsupported HTTP version", 502)
        status = int(match[3])
        fields = self._fields(block)
        framing = fields.framing(version, 502, 502) or UNTIL_CLOSE
        method = self._request_method
        if (
            method == "HEAD"
            or status < 200
            or status in (204, 304)
            or (method == "CONNECT" and status < 300)
        ):
            framing = NO_BODY
        return ResponseHead(
            version=version,
            status=status,
            reason=match[4] or b"",
            headers=fields.headers,
            framing=framing,
            keep_alive=framing is not UNTIL_CLOSE and keep_alive(fields.connection, version),
            block=fields.block,
            watched=fields.watched,
        )
