"""
The policy decider hook (SPEC §9.2): what an embedder's callable receives,
what it may answer, and how it is called.

The decider is consulted only for allowlist misses. It may answer with a
decision, a Deferred or a coroutine; whatever goes wrong (an exception, an
answer of the wrong type, no answer within the timeout) is a deny: the hook
can widen the policy only by saying L{Allow} in time.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Optional, Union

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from codex_proxy.addresses import authority
from codex_proxy._text import escape
from codex_proxy.model import Protocol

_log = Logger()


@attrs.frozen
class NetworkPolicyRequest:
    """
    One allowlist miss, as the decider sees it.

    @ivar protocol: C{http}, C{https_connect}, C{socks5_tcp}, C{socks5_udp}
        (or C{https} for a request inside an intercepted tunnel).
    @ivar host: the normalised destination host.
    @ivar client_addr: the client's C{"ip:port"}, or C{None}.
    @ivar method: the HTTP method, C{None} for SOCKS.
    @ivar command: the client identity or other context the listener knows
        (the SOCKS5 username), or C{None}.
    @ivar client_identity: the authenticated client name (SPEC §11), or
        C{None} for an anonymous connection.
    @ivar exec_policy_hint: an embedder's hint about the command that opened
        the connection; the proxy itself never knows one and passes C{None}.
    """

    protocol: Protocol
    host: str
    port: int
    client_addr: Optional[str] = None
    method: Optional[str] = None
    command: Optional[str] = None
    exec_policy_hint: Optional[str] = None
    client_identity: Optional[str] = None


@attrs.frozen
class Allow:
    """
    Let the allowlist miss through (limited mode and local-address vetting
    still apply).
    """


@attrs.frozen
class Deny:
    """
    Block the request; C{reason} is kept in the blocked history.
    """

    reason: str = "denied by the policy decider"


@attrs.frozen
class Ask:
    """
    Block the request with decision C{ask}: someone has to approve it first.
    """

    reason: str = "approval required"


NetworkDecision = Union[Allow, Deny, Ask]
Decider = Callable[
    [NetworkPolicyRequest],
    Union[NetworkDecision, "defer.Deferred[NetworkDecision]", Awaitable[NetworkDecision]],
]


def consult(
    decider: Decider,
    request: NetworkPolicyRequest,
    clock: IReactorTime,
    timeout: float,
) -> defer.Deferred[NetworkDecision]:
    """
    Ask C{decider} about C{request}. Fires with its decision, or with a
    L{Deny} naming what went wrong when it raised, answered something that
    is no decision, or did not answer within C{timeout} seconds (the
    pending answer is then cancelled). Cancelling the returned Deferred
    cancels the decider's.
    """
    try:
        answer: Any = decider(request)
    except Exception:
        return defer.succeed(_failed(request, Failure()))
    if isinstance(answer, defer.Deferred):
        d = answer
    elif inspect.isawaitable(answer):
        d = defer.ensureDeferred(_awaited(answer))
    else:
        d = defer.succeed(answer)
    d.addTimeout(timeout, clock)

    def check(decision: Any) -> NetworkDecision:
        if isinstance(decision, (Allow, Deny, Ask)):
            return decision
        return _broken(
            request, f"policy decider answered {decision!r}, not Allow, Deny or Ask"
        )

    def failed(failure: Failure) -> NetworkDecision:
        if failure.check(defer.TimeoutError):
            return _broken(request, f"policy decider did not answer within {timeout}s")
        if failure.check(defer.CancelledError):
            # Our caller went away: nothing is decided.
            return failure  # type: ignore[return-value]
        return _failed(request, failure)

    d.addCallbacks(check, failed)
    return d


async def _awaited(answer: Awaitable[Any]) -> Any:
    """
    A coroutine of any awaitable (a future too), for C{ensureDeferred}.
    """
    return await answer


def _failed(request: NetworkPolicyRequest, failure: Failure) -> Deny:
    return _broken(
        request,
        f"policy decider raised {type(failure.value).__name__}: {failure.getErrorMessage()}",
    )


def _broken(request: NetworkPolicyRequest, why: str) -> Deny:
    """
    A deny for a decider that did not decide, logged as a warning for the
    embedder (the request itself fails closed, so it is no error of ours).
    The decider's error may echo the request: the line is escaped.
    """
    _log.warn(
        "{why}; denying {protocol} {target}",
        why=escape(why),
        protocol=request.protocol.value,
        target=authority(escape(request.host), request.port),
    )
    return Deny(why)


__all__ = [
    "Allow",
    "Ask",
    "Decider",
    "Deny",
    "NetworkDecision",
    "NetworkPolicyRequest",
    "consult",
]
