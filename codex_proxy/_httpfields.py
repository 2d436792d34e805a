"""
Header field blocks (RFC 9110 §5, RFC 9112 §5): validated whole, read for
the fields the proxy acts on (framing, routing, the hop-by-hop ones), and
forwarded as received less the hop-by-hop lines. Used by the head parsers
of L{codex_proxy._httphead}.
"""

from __future__ import annotations

import re
from typing import Iterable

from codex_proxy._httpbody import Framing, declared_framing, parse_field

#: Header fields in order: (name exactly as received, value with OWS stripped).
Headers = tuple[tuple[bytes, bytes], ...]

# One whole header line: from a line's start, a token, a colon, optional
# whitespace, a value without control characters (its trailing whitespace
# not captured), CRLF. Nothing in it matches CR or LF before its own CRLF,
# so a match is exactly one line.
_FIELD_LINE = re.compile(
    rb"(?m)^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x08\x0a-\x1f\x7f \t])?)[ \t]*\r\n"
)
#: Fields that concern one connection, never forwarded (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# A Connection header naming these must not make us drop the message's
# routing or length: that would desynchronise the upstream (smuggling).
NOT_CONNECTION_LISTABLE = frozenset({b"host", b"content-length"})
#: The header naming a unix socket to forward a plain request to (SPEC §8).
UNIX_SOCKET_HEADER = b"x-unix-socket"
#: Header fields some origin frameworks take as the request's real method.
METHOD_OVERRIDE_FIELDS = (b"x-http-method-override", b"x-http-method", b"x-method-override")
# Header fields the parsers, forwarding and the policy act on, collected by
# name in the one validation pass: framing, routing, method overrides, and
# the hop-by-hop ones.
_WATCHED = (
    frozenset({b"content-length", b"host", b"expect", b"via", UNIX_SOCKET_HEADER, *METHOD_OVERRIDE_FIELDS})
    | HOP_BY_HOP
)
#: Lower-cased names to the values of the fields of a head so named.
Watched = dict[bytes, list[bytes]]


def first_value(headers: Headers, watched: Watched, name: bytes) -> bytes | None:
    """
    The value of the first field called C{name}, in any case.
    """
    name = name.lower()
    if name in _WATCHED:
        values = watched.get(name)
        return None if values is None else values[0]
    for field, value in headers:
        if field.lower() == name:
            return value
    return None


class Fields:
    """
    A field block, validated and read (L{parse_fields}); read-only, and
    shared by the heads of one parser that carry the same block.

    @ivar raw: the field lines as received, each with its CRLF.
    @ivar headers: the fields in order.
    @ivar watched: the values of the L{_WATCHED} fields by lower-cased name.
    @ivar connection: the options the C{Connection} fields list, C{None}
        without any.
    @ivar block: the field lines to forward (L{forwardable}).
    """

    __slots__ = ("raw", "headers", "watched", "connection", "block", "_framing")

    def __init__(self, raw: bytes, headers: Headers, watched: Watched, block: bytes) -> None:
        self.raw = raw
        self.headers = headers
        self.watched = watched
        self.connection = connection_options(watched)
        self.block = forwardable(block, headers, self.connection)
        self._framing: dict[tuple[int, int], Framing | None] = {}

    def framing(self, version: tuple[int, int], status: int, unsupported_status: int) -> Framing | None:
        """
        L{declared_framing} of these fields in a message of C{version}
        (the statuses are those of the one parser that reads them).
        """
        known = self._framing
        if version in known:
            return known[version]
        framing = known[version] = declared_framing(self.watched, version, status, unsupported_status)
        return framing


def parse_fields(block: bytes, status: int) -> Fields:
    """
    Validate and read the field lines of C{block} (each with its CRLF).

    The common case (every line well formed) is checked and split by one
    regular expression over the whole block, in C: a match is one whole
    line, so as many matches as lines means every line matched. Only a
    block with a line that did not is walked line by line, to name what is
    wrong.
    """
    headers = _FIELD_LINE.findall(block)
    if len(headers) != block.count(b"\n"):
        headers = [parse_field(line, status) for line in block[:-2].split(b"\r\n")]
    watched, hop = watched_fields(headers)
    kept = block
    if hop:
        # Line i of the block is field i.
        lines = block.split(b"\r\n")
        for i in reversed(hop):
            del lines[i]
        kept = b"\r\n".join(lines)
    return Fields(block, tuple(headers), watched, kept)


def watched_fields(headers: Iterable[tuple[bytes, bytes]]) -> tuple[Watched, list[int]]:
    """
    The values of the L{_WATCHED} fields among C{headers} by lower-cased
    name, and the positions of the L{HOP_BY_HOP} ones.
    """
    watched: Watched = {}
    hop: list[int] = []
    for i, (name, value) in enumerate(headers):
        key = name.lower()
        if key in _WATCHED:
            watched.setdefault(key, []).append(value)
            if key in HOP_BY_HOP:
                hop.append(i)
    return watched, hop


def forwardable(block: bytes, headers: Headers, connection: frozenset[bytes] | None) -> bytes | None:
    """
    The field lines to forward as received: C{block} (already without its
    L{HOP_BY_HOP} lines), unless a C{connection} option names one of
    C{headers} to drop as well, when they are encoded again (C{None}).
    """
    named = named_by_connection(connection)
    if named and any(name.lower() in named for name, _ in headers):
        return None
    return block


def named_by_connection(connection: frozenset[bytes] | None) -> frozenset[bytes]:
    """
    The fields that the C{connection} options name, to drop besides the
    L{HOP_BY_HOP} ones; never those of L{NOT_CONNECTION_LISTABLE}.
    """
    if not connection:
        return frozenset()
    return connection - HOP_BY_HOP - NOT_CONNECTION_LISTABLE


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """
    The lower-cased options listed by C{Connection} field values.
    """
    return frozenset([token.strip(b" \t").lower() for value in values for token in value.split(b",")])


def connection_options(seen: dict[bytes, list[bytes]]) -> frozenset[bytes] | None:
    """
    The options of the C{Connection} fields among C{seen}, C{None} without any.
    """
    return connection_tokens(seen[b"connection"]) if b"connection" in seen else None


def keep_alive(connection: frozenset[bytes] | None, version: tuple[int, int]) -> bool:
    """
    Persistence per RFC 9112 §9.3, given the C{Connection} options: HTTP/1.1
    unless C{close}, HTTP/1.0 only with C{keep-alive}.
    """
    if connection is None:
        return version >= (1, 1)
    if b"close" in connection:
        return False
    return version >= (1, 1) or b"keep-alive" in connection
