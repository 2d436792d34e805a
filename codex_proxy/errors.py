"""
The error tree, and the one table mapping a reason to what each wire says.

Listeners never pick status codes or reply codes themselves: they look the
reason up here (SPEC §4.2, §4.3).
"""

from __future__ import annotations

import functools
import http
import json
from typing import Any, Dict, Mapping, Optional

import attrs

from codex_proxy.model import ProxyRequest, Reason, Verdict


class ProxyError(Exception):
    """
    Base of every error this package raises on purpose.
    """


class ProtocolError(ProxyError):
    """
    A peer sent bytes that break the wire format.

    @ivar status: the HTTP status to answer with (400, 414, 431, ...).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class UpstreamError(ProxyError):
    """
    Dialling or talking to the destination failed.

    @ivar upstream_status: the status with which a parent proxy refused our
        C{CONNECT}, if that is what failed.
    """

    def __init__(
        self, reason: Reason, message: str, upstream_status: Optional[int] = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.upstream_status = upstream_status


@attrs.frozen
class Reply:
    """
    How one reason shows on each wire.

    @ivar status: HTTP status code.
    @ivar header: the C{x-proxy-error} value (none for a bad request).
    @ivar socks: the SOCKS5 REP code.
    @ivar message: a sentence for people.
    """

    status: int
    header: Optional[str]
    socks: int
    message: str


# SOCKS5 REP codes (RFC 1928 §6).
SOCKS_GENERAL_FAILURE = 0x01
SOCKS_NOT_ALLOWED = 0x02
SOCKS_HOST_UNREACHABLE = 0x04
SOCKS_CONNECTION_REFUSED = 0x05
SOCKS_TTL_EXPIRED = 0x06
SOCKS_COMMAND_NOT_SUPPORTED = 0x07
SOCKS_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

REPLIES: Dict[Reason, Reply] = {
    Reason.UNIX_SOCKET_NOT_ALLOWED: Reply(
        403,
        "blocked-by-allowlist",
        SOCKS_NOT_ALLOWED,
        "The unix socket is not in allow_unix_sockets.",
    ),
    Reason.PROXY_DISABLED: Reply(
        503, "proxy-disabled", SOCKS_NOT_ALLOWED, "The network proxy is disabled."
    ),
    Reason.TOO_MANY_CONNECTIONS: Reply(
        503,
        "proxy-overloaded",
        SOCKS_GENERAL_FAILURE,
        "The proxy has limits.max_connections client connections open; try again later.",
    ),
    Reason.TOO_MANY_UDP_ASSOCIATIONS: Reply(
        503,
        "proxy-overloaded",
        SOCKS_GENERAL_FAILURE,
        "The proxy has limits.max_udp_associations UDP associations open; try again later.",
    ),
    Reason.INVALID_HOST: Reply(
        400, "invalid-host", SOCKS_GENERAL_FAILURE, "The destination host is invalid."
    ),
    Reason.DENIED: Reply(
        403,
        "blocked-by-denylist",
        SOCKS_NOT_ALLOWED,
        "The destination is on the denylist.",
    ),
    Reason.NOT_ALLOWED_LOCAL: Reply(
        403,
        "blocked-by-allowlist",
        SOCKS_NOT_ALLOWED,
        "Local and private network destinations are blocked.",
    ),
    Reason.NOT_ALLOWED: Reply(
        403,
        "blocked-by-allowlist",
        SOCKS_NOT_ALLOWED,
        "The destination is not on the allowlist.",
    ),
    Reason.METHOD_NOT_ALLOWED: Reply(
        403,
        "blocked-by-method-policy",
        SOCKS_NOT_ALLOWED,
        "Limited mode allows only GET, HEAD and OPTIONS without a body.",
    ),
    Reason.MITM_REQUIRED: Reply(
        403,
        "blocked-by-mitm-required",
        SOCKS_NOT_ALLOWED,
        "Limited mode needs HTTPS interception (mitm = true) for CONNECT.",
    ),
    Reason.POLICY_DENIED: Reply(
        403, "blocked-by-policy", SOCKS_NOT_ALLOWED, "Blocked by policy."
    ),
    Reason.UPSTREAM_DNS_FAILED: Reply(
        502,
        "upstream-dns-failed",
        SOCKS_HOST_UNREACHABLE,
        "The destination name could not be resolved.",
    ),
    Reason.UPSTREAM_CONNECT_FAILED: Reply(
        502,
        "upstream-connect-failed",
        SOCKS_HOST_UNREACHABLE,
        "The destination could not be reached.",
    ),
    Reason.UPSTREAM_REFUSED: Reply(
        502,
        "upstream-connect-failed",
        SOCKS_CONNECTION_REFUSED,
        "The destination refused the connection.",
    ),
    Reason.UPSTREAM_TLS_FAILED: Reply(
        502,
        "upstream-tls-failed",
        SOCKS_GENERAL_FAILURE,
        "The TLS handshake with the destination failed.",
    ),
    Reason.UPSTREAM_TIMEOUT: Reply(
        504,
        "upstream-timeout",
        SOCKS_TTL_EXPIRED,
        "The destination did not answer in time.",
    ),
    Reason.CLIENT_AUTH_FAILED: Reply(
        407,
        "proxy-auth-required",
        SOCKS_GENERAL_FAILURE,
        "The proxy needs a client's credentials (Proxy-Authorization).",
    ),
    Reason.TOO_MANY_CLIENT_CONNECTIONS: Reply(
        503,
        "proxy-overloaded",
        SOCKS_GENERAL_FAILURE,
        "This client has limits.max_connections_per_client connections open;"
        " try again later.",
    ),
    Reason.PROXY_LOOP: Reply(
        508,
        "proxy-loop-detected",
        SOCKS_GENERAL_FAILURE,
        "The request already passed through this proxy: a proxy loop.",
    ),
    Reason.UPSTREAM_BAD_RESPONSE: Reply(
        502,
        "upstream-bad-response",
        SOCKS_GENERAL_FAILURE,
        "The destination sent a malformed or incomplete response.",
    ),
    Reason.SECRET_MISUSE: Reply(
        403,
        "blocked-by-secret-policy",
        SOCKS_NOT_ALLOWED,
        "A secret's placeholder may be sent only to the secret's hosts, over TLS.",
    ),
}


def reply_for(reason: Reason) -> Reply:
    """
    The wire representation of C{reason}.
    """
    return REPLIES[reason]


#: The row of a request that breaks the wire format: its status is the
#: L{ProtocolError}'s (400, 408, 414, 431, ...), and it is no policy
#: decision, so it has no C{x-proxy-error} (and is not in L{REPLIES}).
BAD_REQUEST = Reply(400, None, SOCKS_GENERAL_FAILURE, "The request is malformed.")


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def render(
    status: int,
    header: Optional[str],
    fields: Mapping[str, Any],
    *,
    keep_alive: bool,
    with_body: bool = True,
) -> bytes:
    """
    An HTTP reply of the proxy's own: C{fields} as a JSON document (SPEC
    §4.2), C{x-proxy-error} when there is a C{header}; C{with_body} false
    for a C{HEAD} request (the length is still the document's).
    """
    payload = json.dumps(fields, separators=(",", ":")).encode("utf-8") + b"\n"
    data = b"%s%d\r\nConnection: %s\r\n\r\n" % (
        _head_start(status, header),
        len(payload),
        b"keep-alive" if keep_alive else b"close",
    )
    return data + payload if with_body else data


@functools.lru_cache(maxsize=None)
def _head_start(status: int, header: Optional[str]) -> bytes:
    """
    The constant part of a reply's head, up to the C{Content-Length}
    value: rendered once per status and C{x-proxy-error}.
    """
    lines = [b"HTTP/1.1 %d %s" % (status, _phrase(status))]
    if header is not None:
        lines.append(b"x-proxy-error: " + header.encode("ascii"))
    if status == 407:
        # RFC 9110 §15.5.8: a 407 carries the challenge (SPEC §4.2).
        lines.append(b'Proxy-Authenticate: Basic realm="codex-proxy"')
    lines.append(b"Content-Type: application/json")
    lines.append(b"Content-Length: ")
    return b"\r\n".join(lines)


def blocked_fields(verdict: Verdict) -> Dict[str, Any]:
    """
    The JSON document of a blocked request (SPEC §4.2).
    """
    assert verdict.reason is not None
    return {
        "status": "blocked",
        "host": verdict.host,
        "port": verdict.port,
        "reason": verdict.reason.value,
        "decision": verdict.decision.value,
        "source": verdict.source.value,
        "protocol": verdict.request.protocol.value,
        "message": reply_for(verdict.reason).message,
        **({"secret": verdict.secret} if verdict.secret is not None else {}),
    }


def failure_fields(
    reason: Reason,
    message: str,
    request: Optional[ProxyRequest],
    upstream_status: Optional[int] = None,
) -> Dict[str, Any]:
    """
    The JSON document of a request that failed on its way to the
    destination (SPEC §4.3).
    """
    fields: Dict[str, Any] = {
        "status": "error",
        "host": request.host if request else None,
        "port": request.port if request else None,
        "reason": reason.value,
        "protocol": request.protocol.value if request else None,
        "message": message,
    }
    if upstream_status is not None:
        fields["upstream_status"] = upstream_status
    return fields


def bad_request_fields(error: ProtocolError) -> Dict[str, Any]:
    """
    The JSON document of a request that breaks the wire format.
    """
    return {"status": "error", "reason": "bad_request", "message": error.message}
