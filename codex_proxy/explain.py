"""
What the policy says about one request, without sending it (C{codexproxy
explain}): the decision, its reason and wire reply, the pattern that
matched, the config edit that would change it, and what only a running
proxy can check. Pure: no DNS, no decider, no I/O.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from codex_proxy.config import ProxyConfig
from codex_proxy.errors import ProxyError, reply_for
from codex_proxy.model import Protocol, ProxyRequest, Reason, Verdict
from codex_proxy.policy import Policy, decide, is_local_target, vet

_HTTP_SCHEMES = {"http": 80, "ws": 80}
_TLS_SCHEMES = {"https": 443, "wss": 443}


class UsageError(ProxyError):
    """
    A command-line argument that cannot be used; exit status 2.
    """


def parse_target(text: str, method: Optional[str]) -> Tuple[ProxyRequest, str]:
    """
    The request a client would send for C{text}, and the method of a request
    inside the tunnel (used only when the tunnel would be intercepted).

    A URL is requested the way proxy-aware clients do: C{http://} and
    C{ws://} as a plain proxy request (C{method}, default C{GET}),
    C{https://} and C{wss://} as a C{CONNECT} tunnel. A bare C{host:port} is
    a C{CONNECT} tunnel, or a plain request when C{method} is another one.

    @raise UsageError: C{text} is neither a URL nor C{host:port}.
    """
    method = method.upper() if method else None
    inner = method if method and method != "CONNECT" else "GET"
    if "://" in text:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        try:
            port = parts.port
        except ValueError:
            raise UsageError(f"invalid port in URL {text!r}") from None
        host = parts.hostname or ""
        if scheme in _HTTP_SCHEMES:
            return _plain(host, port or _HTTP_SCHEMES[scheme], method or "GET"), inner
        if scheme in _TLS_SCHEMES:
            return _tunnel(host, port or _TLS_SCHEMES[scheme]), inner
        raise UsageError(
            f"unsupported scheme {parts.scheme!r} in {text!r}"
            " (expected http, https, ws or wss)"
        )
    host, port = _host_port(text)
    if method is None or method == "CONNECT":
        return _tunnel(host, port), inner
    return _plain(host, port, method), inner


def _host_port(text: str) -> Tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text.partition("]")
        host, port = host + "]", rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        raise UsageError(
            f"expected a URL (http://host/path) or host:port, got {text!r}"
        )
    return host, int(port)


def _plain(host: str, port: int, method: str) -> ProxyRequest:
    return ProxyRequest(Protocol.HTTP, host, port, method=method)


def _tunnel(host: str, port: int) -> ProxyRequest:
    return ProxyRequest(Protocol.HTTPS_CONNECT, host, port, method="CONNECT")


def explain(
    config: ProxyConfig, policy: Policy, request: ProxyRequest, inner_method: str
) -> Tuple[List[Tuple[str, str]], bool]:
    """
    What C{policy} says about C{request}, as labelled lines, and whether it
    is allowed. Only the synchronous decision runs: no DNS, no decider.
    """
    verdict = _decide(policy, request)
    rows = [("request", _describe(request))]
    if verdict.intercept:
        rows.append(
            ("tunnel", "intercepted (mitm): each request inside is checked again")
        )
        request = ProxyRequest(
            Protocol.HTTPS, request.host, request.port, method=inner_method
        )
        verdict = _decide(policy, request)
        rows.append(("inside", _describe(request)))
    rows.append(("decision", verdict.decision.value))
    if verdict.reason is not None:
        reply = reply_for(verdict.reason)
        rows += [
            ("reason", f"{verdict.reason.value} ({reply.message})"),
            ("source", verdict.source.value),
            ("x-proxy-error", f"{reply.header} (HTTP {reply.status})"),
        ]
    rows.append(("matched", _matched(config, verdict)))
    rows.append(("to change", _change(config, verdict)))
    if verdict.allowed and not config.allow_local_binding and not is_local_target(
        verdict.host
    ):
        rows.append(
            (
                "not checked",
                "resolution-time checks are not evaluated (explain does not"
                f" resolve names): the proxy still blocks {verdict.host} with"
                " not_allowed_local if any address it resolves to is loopback,"
                " private or link-local",
            )
        )
    if verdict.reason is Reason.NOT_ALLOWED:
        rows.append(
            ("not checked", "a policy decider (library API) may allow an allowlist miss")
        )
    return rows, verdict.allowed


def _decide(policy: Policy, request: ProxyRequest) -> Verdict:
    """
    The synchronous decision, and for an allowed IP literal also the address
    ranges (SPEC §5.3): its one address is known without resolving.
    """
    verdict = decide(policy, request)
    if verdict.allowed and verdict.addresses:
        return vet(policy, verdict, verdict.addresses)
    return verdict


def _describe(request: ProxyRequest) -> str:
    authority = _authority(request.host, request.port)
    return f"{request.method} {authority} (protocol {request.protocol.value})"


def _authority(host: str, port: int) -> str:
    """
    C{host:port}, an IPv6 host in brackets: as a pattern with a port reads.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _matched(config: ProxyConfig, verdict: Verdict) -> str:
    if verdict.matched is None:
        return "no pattern"
    if verdict.matched in config.denied_ranges:
        listed = "denied_ranges entry"
    elif verdict.reason is Reason.DENIED:
        listed = "denied_domains pattern"
    else:
        listed = "allowed_domains pattern"
    where = config.pattern_sources.get(verdict.matched, config.source)
    return f'{listed} "{verdict.matched}" ({where})'


def _change(config: ProxyConfig, verdict: Verdict) -> str:
    """
    The config edit that would turn the decision around.
    """
    table = f"in [{config.section}] of {config.source}"
    host = verdict.host
    if verdict.allowed:
        where = config.pattern_sources.get(verdict.matched or "", "its allowlist entry")
        return f'remove {where}, or add "{host}" to denied_domains {table}'
    suggestions: Dict[Reason, Callable[[], str]] = {
        Reason.PROXY_DISABLED: lambda: f"set enabled = true {table}",
        Reason.INVALID_HOST: lambda: (
            "no config change: the host or port is not valid"
        ),
        Reason.DENIED: lambda: (
            f'remove {config.pattern_sources.get(verdict.matched or "", "the entry")}'
            f' ("{verdict.matched}"); the allowlist then decides'
        ),
        Reason.NOT_ALLOWED_LOCAL: lambda: (
            f'add the exact entry "{host}" (or "{_authority(host, verdict.port)}" for this port'
            f" only) to allowed_domains {table} (wildcards never unlock local"
            " targets), or set allow_local_binding = true"
        ),
        Reason.NOT_ALLOWED: lambda: f'add "{host}" to allowed_domains {table}',
        Reason.METHOD_NOT_ALLOWED: lambda: f'set mode = "full" {table}',
        Reason.MITM_REQUIRED: lambda: (
            f'set mitm = true (HTTPS interception) or mode = "full" {table}'
        ),
    }
    assert verdict.reason is not None
    return suggestions[verdict.reason]()
