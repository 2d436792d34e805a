"""
The operations listener (SPEC §13): a small C{twisted.web} resource tree.

  - C{/metrics}: the Prometheus text exposition of a L{Metrics} registry;
  - C{/healthz}: C{200 ok} once the listeners are bound and a policy is
    loaded, else C{503};
  - C{/blocked}: the recent blocked decisions (SPEC §9.3 fields), newest
    first, as JSON;
  - C{/policy}: the effective policy as JSON.

Anything else is C{404}; any method but C{GET} and C{HEAD} on a page is
C{405}. With a token, every request needs C{Authorization: Bearer TOKEN}
(compared in constant time) or gets C{401} with C{WWW-Authenticate:
Bearer}; the token is never echoed or logged. The listener binds loopback
only; which address is the caller's business (the config refuses others).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from codex_proxy.metrics import Metrics

_PAGE_METHODS = (b"GET", b"HEAD")
_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"

#: Key names whose plain values are never rendered, whatever a
#: C{policy()} callable hands over.
_SENSITIVE = ("token", "secret", "password")
REDACTED = "(redacted)"


class _Status(Resource):
    """
    A fixed plain-text answer to any method and any path below it.
    """

    isLeaf = True

    def __init__(self, status: int, text: str, headers: Mapping[bytes, bytes] = {}) -> None:
        super().__init__()
        self._status = status
        self._text = text.encode("utf-8")
        self._headers = headers

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self._status)
        request.setHeader(b"content-type", _TEXT)
        for name, value in self._headers.items():
            request.setHeader(name, value)
        return self._text


_NOT_FOUND = _Status(404, "not found\n")
_NOT_ALLOWED = _Status(405, "method not allowed\n", {b"allow": b"GET, HEAD"})
_UNAUTHORIZED = _Status(
    401, "a valid bearer token is required\n", {b"www-authenticate": b"Bearer"}
)


#: What a page answers a C{GET} with: status, content type, body.
Answer = Tuple[int, bytes, bytes]


class _Page(Resource):
    """
    One page: C{answer()} answers C{GET}, and C{HEAD} with the same
    headers and no body; nothing lives below it.
    """

    def __init__(self, answer: Callable[[], Answer]) -> None:
        super().__init__()
        self._answer = answer

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NOT_FOUND

    def render(self, request: Request) -> bytes:
        if request.method not in _PAGE_METHODS:
            return _NOT_ALLOWED.render(request)
        status, content_type, body = self._answer()
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % (len(body),))
            return b""
        return body


def _json(document: Any) -> Answer:
    return 200, _JSON, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def redact(value: Any) -> Any:
    """
    C{value} with every plain value under a key naming a token, secret or
    password replaced by L{REDACTED}, in mappings and lists at any depth:
    a second fence behind the caller's promise that C{/policy} holds none.
    """
    if isinstance(value, Mapping):
        return {
            key: (
                REDACTED
                if _sensitive(key) and not isinstance(item, (Mapping, list, tuple))
                else redact(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    return value


def _sensitive(key: Any) -> bool:
    name = str(key).lower()
    return any(word in name for word in _SENSITIVE)


class _Root(Resource):
    """
    The tree's root: checks the bearer token before any page is looked up,
    so without it nothing (not even which paths exist) can be learnt.
    """

    def __init__(self, token: Optional[bytes]) -> None:
        super().__init__()
        self._token = token

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if not self._authorized(request):
            return _UNAUTHORIZED
        page: Resource = self.children.get(path, _NOT_FOUND)
        return page

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        header = request.getHeader(b"authorization")
        if header is None:
            return False
        scheme, _, credentials = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            credentials.strip(), self._token
        )


class _AdminSite(Site):
    """
    A L{Site} without an access log: a scraper polls it every few seconds,
    and those lines would bury the proxy's own.
    """

    noisy = False
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        pass


def admin_site(
    metrics: Metrics,
    ready: Callable[[], bool],
    blocked: Callable[[], Sequence[Mapping[str, Any]]],
    policy: Callable[[], Mapping[str, Any]],
    token: Optional[str],
    reactor: Optional[IReactorTime] = None,
) -> Site:
    """
    The operations listener's factory.

    @param ready: whether the listeners are bound and a policy is loaded.
    @param blocked: the recent blocked decisions' audit fields, oldest
        first (served newest first).
    @param policy: the effective policy as C{check-config} shows it, as a
        JSON-able mapping without tokens or secret values.
    @param token: the bearer token every request must carry, or C{None}.
    @param reactor: for the connections' idle timeout (default: the global
        reactor).
    """
    root = _Root(None if token is None else token.encode("utf-8"))
    exposition = CONTENT_TYPE_LATEST.encode("ascii")
    root.putChild(b"metrics", _Page(lambda: (200, exposition, generate_latest(metrics.registry))))
    root.putChild(
        b"healthz",
        _Page(lambda: (200, _TEXT, b"ok\n") if ready() else (503, _TEXT, b"not ready\n")),
    )
    root.putChild(b"blocked", _Page(lambda: _json(list(reversed(blocked())))))
    root.putChild(b"policy", _Page(lambda: _json(redact(policy()))))
    return _AdminSite(root, timeout=60, reactor=reactor)


__all__ = ["REDACTED", "admin_site", "redact"]
