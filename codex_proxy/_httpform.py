"""
The request-target forms of RFC 9112 §3.2 and the authority grammar they
share with C{Host}: which form a target takes, and its scheme, host, port
and path, or the L{ProtocolError} (status 400) naming what is wrong.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Literal, TypeVar

from codex_proxy.errors import ProtocolError

#: The request-target forms of RFC 9112 §3.2.
Form = Literal["absolute", "authority", "origin", "asterisk"]
#: The port each URL scheme defaults to.
DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^?#]*)(\?[^#]*)?(?:#.*)?")
_AUTHORITY = re.compile(
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]+)(?::([0-9]{1,5}))?"
)


#: The longest authority the caches of L{cached_when_short} keep: a
#: bracketed IPv6 literal or a host name of 253 characters, with a port.
_CACHED_LENGTH = 262
_K = TypeVar("_K", str, bytes)
_A = TypeVar("_A")
_R = TypeVar("_R")


def cached_when_short(function: Callable[[_K, _A], _R]) -> Callable[[_K, _A], _R]:
    """
    C{function} of an authority, cached: the same few authorities come back
    on every request. Only results (not errors) for an authority as short
    as a host name can be are kept, so the cache stays small whatever
    clients send.
    """
    cached = functools.lru_cache(maxsize=1024)(function)

    @functools.wraps(function)
    def split(authority: _K, arg: _A) -> _R:
        return cached(authority, arg) if len(authority) <= _CACHED_LENGTH else function(authority, arg)

    # What is kept, for tests and a curious operator: lru_cache's own.
    setattr(split, "cache_info", cached.cache_info)
    return split


@cached_when_short
def split_authority(authority: str, port_required: bool) -> tuple[str, int | None]:
    """
    Split C{host[:port]}; reject userinfo, an empty host and bad ports.
    """
    if "@" in authority:
        raise ProtocolError("userinfo in the request target", 400)
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        raise ProtocolError("invalid host or port in the request target", 400)
    host, raw_port = match[1], match[2]
    if raw_port is None:
        if port_required:
            raise ProtocolError("CONNECT target without a port", 400)
        return host, None
    port = int(raw_port)
    if not 0 < port < 65536:
        raise ProtocolError("port out of range in the request target", 400)
    return host, port


def target_form(
    method: str, target: str
) -> tuple[Form, str | None, str | None, int | None, str]:
    """
    Classify the request target (RFC 9112 §3.2): (form, scheme, host, port,
    path).
    """
    if method == "CONNECT":
        host, port = split_authority(target, True)
        return "authority", None, host, port, ""
    if target.startswith("/"):
        return "origin", None, None, None, target
    if target == "*":
        if method != "OPTIONS":
            raise ProtocolError("asterisk-form target on a method other than OPTIONS", 400)
        return "asterisk", None, None, None, ""
    match = _ABSOLUTE.fullmatch(target)
    if match is None:
        if _AUTHORITY.fullmatch(target):
            raise ProtocolError("authority-form target on a method other than CONNECT", 400)
        raise ProtocolError("invalid request target", 400)
    scheme = match[1].lower()
    host, port = split_authority(match[2], False)
    if port is None:
        port = DEFAULT_PORTS.get(scheme)
    path = (match[3] or "/") + (match[4] or "")
    return "absolute", scheme, host, port, path
