"""
From a parsed request head to what the proxy decides and forwards (pure):
the L{ProxyRequest} a head asks for (request-target forms, C{Host} checks,
default ports, unix-socket targets), the heads written onward (hop-by-hop
fields dropped; requests in origin-form or, toward a parent proxy,
absolute-form), and the one C{host:port} formatter of the package.
"""

from __future__ import annotations

import re
from typing import Callable, Optional
from urllib.parse import unquote_plus

from codex_proxy import _httpbody, _httphead, _placeholders
from codex_proxy._httpform import DEFAULT_PORTS, cached_when_short, split_authority
from codex_proxy._httpfields import (
    HOP_BY_HOP,
    METHOD_OVERRIDE_FIELDS,
    UNIX_SOCKET_HEADER,
    Headers,
    Watched,
    connection_tokens,
    named_by_connection,
)
from codex_proxy.addresses import authority
from codex_proxy.domains import InvalidHost, normalize_host
from codex_proxy.errors import ProtocolError
from codex_proxy.model import UNIX_SOCKET_HOST, Protocol, ProxyRequest, Verdict

#: The schemes of absolute-form requests we forward (wss takes CONNECT).
_FORWARDED_SCHEMES = frozenset({"http", "ws", "https"})
_HTTPS_PORT = DEFAULT_PORTS["https"]
#: The query parameter some frameworks take as the request's real method
#: (Rails, Laravel, method-override).
_OVERRIDE_PARAMETER = "_method"
_QUERY_SEPARATOR = re.compile("[&;]")


@cached_when_short
def split_host_header(value: bytes, default_port: int) -> tuple[str, int]:
    """
    Split a C{Host} header into normalised host and port, with the request
    target's authority rules (L{split_authority}).
    """
    text = value.decode("ascii", "replace").strip()
    try:
        host, port = split_authority(text, False)
        return normalize_host(host), default_port if port is None else port
    except (ProtocolError, InvalidHost) as e:
        raise ProtocolError(f"malformed Host header {text!r}: {e}")


def _check_host_header(head: _httphead.RequestHead, host: str, port: int) -> None:
    """
    An absolute-form request's C{Host}, if any, must name its target (SPEC
    §4.2a); default ports are equal.
    """
    # Host is a watched field: its values are at hand (as head.header reads them).
    values = head.watched.get(b"host")
    if values is None:
        return
    value = values[0]
    try:
        target = normalize_host(host)
    except InvalidHost:
        return  # The policy reports the invalid target itself.
    if split_host_header(value, DEFAULT_PORTS[head.scheme or "http"]) != (target, port):
        raise ProtocolError(
            f"Host header {value.decode('ascii', 'replace')!r} does not match"
            f" the request target {authority(host, port)}"
        )


def request_for(
    head: _httphead.RequestHead,
    client: Optional[str],
    resolve_socket: Callable[[str], str],
    placeholders: bool = True,
    identity: Optional[str] = None,
) -> ProxyRequest:
    """
    What a head on the listener asks for, for the client C{identity} (as
    authenticated on the connection so far). C{resolve_socket} turns an
    absolute C{x-unix-socket} path into the one the policy compares (it
    resolves symlinks: I/O, so the caller provides it). Without
    C{placeholders} (no secret is configured, so none can be misused) the
    header values are not scanned for them.

    @raise ProtocolError: the target cannot be served by a proxy.
    """
    if head.form == "authority":
        assert head.host is not None and head.port is not None
        protocol, host, port = Protocol.HTTPS_CONNECT, head.host, head.port
    elif head.form == "absolute":
        if head.scheme not in _FORWARDED_SCHEMES:
            raise ProtocolError(
                f"unsupported scheme {head.scheme!r} in absolute-form request"
                " (use CONNECT for wss)"
            )
        assert head.host is not None and head.port is not None
        # https://: plain HTTP to us, TLS from us to the origin.
        protocol = Protocol.HTTPS if head.scheme == "https" else Protocol.HTTP
        host, port = head.host, head.port
        _check_host_header(head, host, port)
    elif head.form == "origin":
        value = head.header(b"host")
        if not value:
            raise ProtocolError("origin-form request without a Host header")
        host, port = split_host_header(value, 80)
        protocol = Protocol.HTTP
    else:
        raise ProtocolError(f"a proxy cannot serve request target {head.target!r}")
    unix_socket = None
    socket_header = head.watched.get(UNIX_SOCKET_HEADER)
    if socket_header is not None and protocol is Protocol.HTTP:
        path = socket_header[0].decode("utf-8", "surrogateescape").strip()
        # A relative path is kept as sent, for the policy to refuse.
        unix_socket = resolve_socket(path) if path.startswith("/") and "\0" not in path else path
        host, port = UNIX_SOCKET_HOST, 0
    return _request(head, protocol, host, port, client, placeholders, identity, unix_socket)


def request_of(
    head: _httphead.RequestHead,
    tunnel: Optional[Verdict],
    client: Optional[str],
    resolve_socket: Callable[[str], str],
    placeholders: bool,
    identity: Optional[str],
) -> ProxyRequest:
    """
    What C{head} asks for on the HTTP listener: an inner request of the
    intercepted C{tunnel} (L{inner_request}), or a request of its own
    (L{request_for}), which explains the other arguments.
    """
    if tunnel is not None:
        return inner_request(head, tunnel.host, tunnel.port, client, placeholders, identity)
    return request_for(head, client, resolve_socket, placeholders, identity)


def inner_request(
    head: _httphead.RequestHead,
    host: str,
    port: int,
    client: Optional[str],
    placeholders: bool = True,
    identity: Optional[str] = None,
) -> ProxyRequest:
    """
    A request inside the intercepted tunnel to C{host:port}: its target must
    be the tunnel's own host and port (SPEC §6), named by C{Host}. See
    L{request_for} for C{placeholders} and C{identity}.

    @raise ProtocolError: it names another target (421), is a CONNECT (405)
        or has no C{Host} (400).
    """
    tunnel = authority(host, port)
    if head.form == "authority":
        raise ProtocolError(f"CONNECT {head.target} inside the intercepted tunnel to {tunnel}", 405)
    value = head.header(b"host")
    if not value:
        raise ProtocolError("request without a Host header inside an intercepted tunnel")
    named = [split_host_header(value, _HTTPS_PORT)]
    if head.form == "absolute":
        assert head.host is not None and head.port is not None
        if head.scheme != "https":
            raise ProtocolError(f"{head.scheme}:// request inside an intercepted https tunnel", 421)
        try:
            named.append((normalize_host(head.host), head.port))
        except InvalidHost:
            raise ProtocolError(f"malformed request target {head.target!r}")
    for other in named:
        if other != (host, port):
            raise ProtocolError(
                f"request for {authority(*other)} inside the tunnel to {tunnel}", 421
            )
    return _request(head, Protocol.HTTPS, host, port, client, placeholders, identity)


def _request(
    head: _httphead.RequestHead,
    protocol: Protocol,
    host: str,
    port: int,
    client: Optional[str],
    placeholders: bool,
    identity: Optional[str],
    unix_socket: Optional[str] = None,
) -> ProxyRequest:
    """
    The L{ProxyRequest} of C{head} for C{host:port}: what the policy reads
    of the head besides its target (method, body, upgrade, method
    overrides, the secrets its placeholders name).
    """
    return ProxyRequest(
        protocol=protocol,
        host=host,
        port=port,
        method=head.method,
        has_body=head.framing is not _httpbody.NO_BODY,
        upgrade=head.upgrade,
        # A tunnel's own fields name no method of a request it carries.
        override_methods=(
            () if protocol is Protocol.HTTPS_CONNECT else method_overrides(head.watched, head.path)
        ),
        client=client,
        client_identity=identity,
        unix_socket=unix_socket,
        secrets=_placeholders.named(head.headers) if placeholders else (),
    )


def method_overrides(watched: Watched, target: str) -> tuple[str, ...]:
    """
    The methods a request names in place of its own, upper-cased, for
    L{ProxyRequest.override_methods}: the values of method-override header
    fields among C{watched} (a head's L{Watched} fields) and of C{_method}
    parameters in the query of C{target} (SPEC §4.4). Read as leniently as the frameworks that honour them: any case,
    percent- or plus-encoded, C{;} or C{&} separated, comma-listed.
    """
    named = [value.decode("latin-1") for name in METHOD_OVERRIDE_FIELDS for value in watched.get(name, ())]
    query = target.partition("?")[2].partition("#")[0] if "?" in target else ""
    if _OVERRIDE_PARAMETER in query.lower() or "%" in query:
        for pair in _QUERY_SEPARATOR.split(query):
            name, _, value = pair.partition("=")
            if unquote_plus(name).strip().lower() == _OVERRIDE_PARAMETER:
                named.append(unquote_plus(value))
    if not named:
        return ()
    return tuple(
        method
        for text in named
        for method in (part.strip().upper() for part in text.split(","))
        if method
    )


def is_websocket_upgrade(head: _httphead.RequestHead) -> bool:
    """
    A body-less GET asking to upgrade to websocket: the only upgrade we pass
    on (SPEC §1); every other C{Upgrade} is dropped as hop-by-hop.
    """
    if head.method != "GET" or not head.upgrade or head.framing is not _httpbody.NO_BODY:
        return False
    value = head.header(b"upgrade") or b""
    return b"websocket" in [token.strip().lower() for token in value.split(b",")]


def via_value(instance: str) -> bytes:
    """
    Our C{Via} entry (RFC 9110 §7.6.3): the pseudonym names this process.
    """
    return b"1.1 codex-proxy-" + instance.encode("ascii")


def came_through(head: _httphead.RequestHead, via: bytes) -> bool:
    """
    Whether C{head} already passed through the proxy whose C{Via} entry is
    C{via}: the request went round a loop.
    """
    values = head.watched.get(b"via")
    if values is None:
        return False
    pseudonym = via.split(b" ", 1)[1].lower()
    for value in values:
        for entry in value.split(b","):
            parts = entry.split()
            if len(parts) >= 2 and parts[1].lower() == pseudonym:
                return True
    return False


def outgoing_head(
    head: _httphead.RequestHead,
    request: ProxyRequest,
    via: bytes,
    *,
    parent_authorization: Optional[bytes] = None,
    absolute_form: bool = False,
) -> bytes:
    """
    The head to forward for C{head}: hop-by-hop fields dropped, C{Host}
    added when the client left it out, our C{Via}, the target in
    origin-form, or in absolute-form with our credentials toward a parent
    proxy (SPEC §7); a websocket upgrade keeps its C{Upgrade}. The field
    lines go as received when that is all that changes (C{head.block}).
    """
    block = head.block
    fields: Headers = ()  # after the block
    if block is None or request.unix_socket is not None:
        # Encoded again, all of them.
        block = b""
        fields = strip_hop_by_hop(head.headers)
        if request.unix_socket is not None:
            fields = tuple((k, v) for k, v in fields if k.lower() != UNIX_SOCKET_HEADER)
    if b"host" not in head.watched:
        assert head.host is not None and head.port is not None
        default = DEFAULT_PORTS[head.scheme or "http"]
        fields += ((b"Host", authority(head.host, head.port, default).encode("ascii")),)
    if head.framing is _httpbody.CHUNKED:
        fields += ((b"Transfer-Encoding", b"chunked"),)
    fields += ((b"Via", via),)
    target = head.path if head.form == "absolute" else head.target
    if absolute_form:
        target = f"http://{authority(normalize_host(request.host), request.port, 80)}{target}"
        if parent_authorization is not None:
            fields += ((b"Proxy-Authorization", parent_authorization),)
    if is_websocket_upgrade(head):
        fields += (
            (b"Connection", b"Upgrade"),
            (b"Upgrade", head.header(b"upgrade") or b"websocket"),
        )
    return serialize_request_head(head.method, target, fields, block)


def strip_hop_by_hop(headers: Headers) -> Headers:
    """
    Drop L{HOP_BY_HOP} fields and those the C{Connection} fields name
    (except C{Host} and C{Content-Length}, which keep the message routable
    and delimited).
    """
    # One pass, each name lowered once; a second only when Connection names
    # fields beyond the hop-by-hop ones (rare).
    kept = []
    connection: list[bytes] = []
    for field in headers:
        name = field[0].lower()
        if name not in HOP_BY_HOP:
            kept.append(field)
        elif name == b"connection":
            connection.append(field[1])
    named = named_by_connection(connection_tokens(connection)) if connection else None
    if named:
        kept = [field for field in kept if field[0].lower() not in named]
    return tuple(kept)


def _serialize(start: bytes, headers: Headers, block: bytes) -> bytes:
    """
    A head: the start line, C{block} (field lines a parser validated, each
    with its CRLF), then C{headers}; refuse CR/LF smuggled inside the start
    line or C{headers}.
    """
    # Most forwarded responses add no field: the start line alone.
    ours = b"\r\n".join([start, *map(b": ".join, headers), b""]) if headers else start + b"\r\n"
    if ours.count(b"\n") != len(headers) + 1 or ours.count(b"\r") != len(headers) + 1:
        raise ValueError("CR or LF inside a start line or header")
    if not block:
        return ours + b"\r\n"
    end = len(start) + 2
    return b"".join((ours[:end], block, ours[end:], b"\r\n"))


def serialize_request_head(method: str, target: str, headers: Headers, block: bytes = b"") -> bytes:
    """
    Encode an HTTP/1.1 request head (C{block} as in L{_serialize}).
    """
    start = b"%s %s HTTP/1.1" % (method.encode("ascii"), target.encode("ascii"))
    return _serialize(start, headers, block)


def serialize_response_head(
    version: tuple[int, int], status: int, reason: bytes, headers: Headers, block: bytes = b""
) -> bytes:
    """
    Encode a response head (C{block} as in L{_serialize}).
    """
    start = b"HTTP/%d.%d %03d %s" % (version[0], version[1], status, reason)
    return _serialize(start, headers, block)


def forwarded_response_head(head: _httphead.ResponseHead, added: Headers = ()) -> bytes:
    """
    The HTTP/1.1 head to send on for C{head}: its fields less the hop-by-hop
    ones, then C{added}. The field lines go as received when that is all
    that changes (C{head.block}); else the fields are encoded again.
    """
    if head.block is None:
        return serialize_response_head((1, 1), head.status, head.reason, strip_hop_by_hop(head.headers) + added)
    return serialize_response_head((1, 1), head.status, head.reason, added, head.block)
