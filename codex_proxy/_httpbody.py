"""
HTTP/1.x message bodies, sans-IO (RFC 9112 §6, §7): the framing a head
declares, and the readers that delimit a body by length, chunked
(validated as it streams, trailers included) or until the connection
closes.

Limits are always passed in: a chunked body's trailers are bounded by the
configured head limits, never by defaults.
"""

from __future__ import annotations

import abc
import re

import attrs

from codex_proxy.errors import ProtocolError

#: A header name (RFC 9110 §5.6.2 token).
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")


@attrs.frozen
class HeadLimits:
    """
    Size limits of one message head (SPEC §2.6).

    @ivar max_request_line_bytes: longest request (or status) line, CRLF
        excluded.
    @ivar max_header_bytes: longest head, from the start line to the blank
        line inclusive; also bounds a chunked body's trailer section.
    @ivar max_header_fields: most header (or trailer) fields.
    """

    max_request_line_bytes: int = 8192
    max_header_bytes: int = 65536
    max_header_fields: int = 100


@attrs.frozen
class NoBody:
    """
    The message ends with its head.
    """


@attrs.frozen
class Length:
    """
    The body is exactly C{n} bytes (C{n > 0}; a zero length is L{NoBody}).
    """

    n: int


@attrs.frozen
class Chunked:
    """
    The body uses the chunked transfer coding.
    """


@attrs.frozen
class UntilClose:
    """
    The body runs until the server closes the connection (responses only).
    """


Framing = NoBody | Length | Chunked | UntilClose
NO_BODY = NoBody()
CHUNKED = Chunked()
UNTIL_CLOSE = UntilClose()

_CHUNK_SIZE = re.compile(
    rb"([0-9A-Fa-f]{1,16})"
    rb"(?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb"(?:[ \t]*=[ \t]*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb'|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*'
)
# The longest chunk-size line (size and extensions) a ChunkedReader holds.
_MAX_CHUNK_LINE = 4096


def parse_field(line: bytes, status: int) -> tuple[bytes, bytes]:
    """
    Validate one C{name: value} line; return the name and the stripped value.
    """
    if line[0] in b" \t":
        raise ProtocolError("obsolete line folding in a header", status)
    name, colon, value = line.partition(b":")
    if not colon:
        raise ProtocolError("header line without a colon", status)
    if not TOKEN.fullmatch(name):
        if name.rstrip(b" \t") != name:
            raise ProtocolError("whitespace between header name and colon", status)
        raise ProtocolError("invalid header name", status)
    value = value.strip(b" \t")
    if _BAD_VALUE.search(value):
        raise ProtocolError("control character in a header value", status)
    return name, value


def declared_framing(
    seen: dict[bytes, list[bytes]],
    version: tuple[int, int],
    status: int,
    unsupported_status: int,
) -> Framing | None:
    """
    The framing C{Content-Length}/C{Transfer-Encoding} declare, or C{None}
    when neither is present; every ambiguous combination is rejected.
    """
    lengths = seen.get(b"content-length", ())
    codings = seen.get(b"transfer-encoding", ())
    if len(lengths) > 1:
        raise ProtocolError("more than one Content-Length", status)
    if lengths and codings:
        raise ProtocolError("both Content-Length and Transfer-Encoding", status)
    if codings:
        if version < (1, 1):
            raise ProtocolError("Transfer-Encoding in an HTTP/1.0 message", status)
        if len(codings) > 1 or codings[0].lower() != b"chunked":
            raise ProtocolError(
                "Transfer-Encoding other than chunked", unsupported_status
            )
        return CHUNKED
    if lengths:
        if not _CONTENT_LENGTH.fullmatch(lengths[0]):
            raise ProtocolError("invalid Content-Length", status)
        length = int(lengths[0])
        return Length(length) if length else NO_BODY
    return None


class BodyReader(abc.ABC):
    """
    Delimit one message body in a byte stream.
    """

    @abc.abstractmethod
    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        """
        Consume C{data}: return (bytes to forward, message complete?, bytes
        after the body).

        @raise ProtocolError: the body framing is broken.
        """


class LengthReader(BodyReader):
    """
    A body of a known number of bytes.
    """

    def __init__(self, length: int) -> None:
        self._remaining = length

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            return data, False, b""
        self._remaining = 0
        if len(data) == remaining:
            return data, True, b""
        return data[:remaining], True, data[remaining:]


class UntilCloseReader(BodyReader):
    """
    A body that ends when the connection does: every byte is body.
    """

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        return data, False, b""


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedReader(BodyReader):
    """
    A chunked body (RFC 9112 §7.1), validated as it streams.

    With C{decode=False} the validated wire bytes are forwarded as they are
    (the head forwarded with them must say C{Transfer-Encoding: chunked});
    with C{decode=True} only the payload is, and trailers are dropped.  Only
    an unfinished size or trailer line is held back, never chunk data.
    """

    def __init__(self, limits: HeadLimits, decode: bool = False) -> None:
        self._decode = decode
        self._limits = limits
        self._state = _SIZE
        self._remaining = 0
        self._held = bytearray()
        self._trailer_bytes = 0
        self._trailer_fields = 0

    @property
    def buffered(self) -> int:
        """
        Bytes of an unfinished line held until it can be validated.
        """
        return len(self._held)

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        if self._state == _DONE:
            return b"", True, data
        held = old_held = self._held
        payload: list[bytes] = []
        pos = validated = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                if self._decode:
                    payload.append(data[pos : pos + take])
                pos = validated = pos + take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _DATA_END:
                need = b"\r\n"[len(held) :]
                got = data[pos : pos + len(need)]
                if not need.startswith(got):
                    raise ProtocolError("chunk data not followed by CRLF", 400)
                pos += len(got)
                if got != need:
                    held = bytearray(got)
                    break
                held = bytearray()
                validated = pos
                self._state = _SIZE
            else:
                lf = data.find(b"\n", pos)
                if lf < 0:
                    # Every completed element replaced held, so this never
                    # grows bytes that are about to be forwarded.
                    held += memoryview(data)[pos:]
                    if len(held) > self._line_room():
                        raise ProtocolError("chunked body line too long", 400)
                    break
                line = bytes(held) + data[pos:lf] if held else data[pos:lf]
                held = bytearray()
                pos = lf + 1
                if not line.endswith(b"\r"):
                    raise ProtocolError("bare LF in a chunked body", 400)
                if state == _SIZE:
                    self._size_line(line[:-1])
                else:
                    self._trailer_line(line[:-1])
                validated = pos
                if self._state == _DONE:
                    break
        self._held = held
        done = self._state == _DONE
        leftover = data[pos:] if done else b""
        if self._decode:
            forward = payload[0] if len(payload) == 1 else b"".join(payload)
        elif not validated:
            forward = b""
        elif old_held:
            forward = bytes(old_held) + data[:validated]
        else:
            forward = data[:validated]
        return forward, done, leftover

    def _line_room(self) -> int:
        """
        How long the unfinished line may grow.
        """
        if self._state == _SIZE:
            return _MAX_CHUNK_LINE
        return self._limits.max_header_bytes - self._trailer_bytes

    def _size_line(self, line: bytes) -> None:
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None:
            raise ProtocolError("invalid chunk size line", 400)
        self._remaining = int(match[1], 16)
        self._state = _DATA if self._remaining else _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._state = _DONE
            return
        parse_field(line, 400)
        self._trailer_bytes += len(line) + 2
        self._trailer_fields += 1
        if self._trailer_bytes > self._limits.max_header_bytes:
            raise ProtocolError("trailer section too large", 400)
        if self._trailer_fields > self._limits.max_header_fields:
            raise ProtocolError("too many trailer fields", 400)


def body_reader(
    framing: Framing, limits: HeadLimits, *, decode_chunked: bool = False
) -> BodyReader | None:
    """
    The reader for a body framed as C{framing}; C{None} when there is none.
    C{limits} bound a chunked body's trailer section like a head (SPEC §2.6).
    """
    if framing is NO_BODY:
        return None
    if type(framing) is Length:
        return LengthReader(framing.n)
    if framing is CHUNKED:
        return ChunkedReader(limits, decode=decode_chunked)
    return UntilCloseReader()
