"""
Outbound connections: the only place that dials out.

Callers hand over the vetted addresses of a L{Verdict}; this module never
sees a hostname, so nothing can resolve a name a second time (SPEC §5.2).
Addresses are tried in order until one connects.
"""

from __future__ import annotations

from typing import Optional, Sequence

from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTCP
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy.errors import UpstreamError
from codex_proxy.live import Connections
from codex_proxy.model import IPAddress, Reason


class Sink:
    """
    What an L{Outbound} connection reports to once it is attached.
    """

    def outboundData(self, data: bytes) -> None:
        raise NotImplementedError

    def outboundEOF(self) -> None:
        raise NotImplementedError

    def outboundLost(self, reason: Failure) -> None:
        raise NotImplementedError


@implementer(IHalfCloseableProtocol)
class Outbound(Protocol):
    """
    A connection to a destination. Its events go to C{sink}, which the caller
    attaches when the dial's Deferred fires (before any byte can arrive).
    """

    sink: Optional[Sink] = None
    factory: "_DialFactory"

    def connectionMade(self) -> None:
        self.factory.connections.opened(self.transport)
        self.factory.connected(self)

    def attach(self, sink: Sink) -> None:
        self.sink = sink
        # Skip one indirection per chunk on the hot path.
        self.dataReceived = sink.outboundData  # type: ignore[method-assign]

    def dataReceived(self, data: bytes) -> None:
        # Only reached before attach(); the dial callback attaches
        # synchronously, so this cannot lose bytes in practice.
        raise RuntimeError("outbound data before a sink was attached")

    def readConnectionLost(self) -> None:
        if self.sink is not None:
            self.sink.outboundEOF()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.factory.connections.closed(self.transport)
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink.outboundLost(reason)


def _classify(failure: Failure, where: str) -> UpstreamError:
    if failure.check(error.ConnectionRefusedError):
        return UpstreamError(Reason.UPSTREAM_REFUSED, f"{where} refused the connection")
    if failure.check(error.TimeoutError, defer.TimeoutError):
        return UpstreamError(Reason.UPSTREAM_TIMEOUT, f"connecting to {where} timed out")
    return UpstreamError(
        Reason.UPSTREAM_CONNECT_FAILED,
        f"connecting to {where} failed: {failure.getErrorMessage()}",
    )


class _DialFactory(ClientFactory):
    noisy = False
    protocol = Outbound

    def __init__(self, deferred: defer.Deferred[Outbound], connections: Connections) -> None:
        self.deferred = deferred
        self.connections = connections

    def connected(self, proto: Outbound) -> None:
        if self.deferred.called:  # cancelled meanwhile
            proto.transport.abortConnection()
        else:
            self.deferred.callback(proto)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(reason)


class Upstream:
    """
    Dials vetted addresses with a connect timeout.

    @ivar connections: where outbound connections register while open.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        connect_timeout: float = 10.0,
        connections: Optional[Connections] = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self.connections = connections if connections is not None else Connections()

    def connect(
        self, addresses: Sequence[IPAddress], port: int
    ) -> defer.Deferred[Outbound]:
        """
        Connect to the first of C{addresses} that accepts, on C{port}.
        Fails with L{UpstreamError} naming the last failure. Cancelling the
        Deferred stops the attempt in progress.
        """
        if not addresses:
            return defer.fail(
                UpstreamError(Reason.UPSTREAM_DNS_FAILED, "no address to connect to")
            )
        result: defer.Deferred[Outbound]
        current: list = [None]

        def cancel(_: object) -> None:
            connector = current[0]
            if connector is not None:
                connector.stopConnecting()

        result = defer.Deferred(cancel)

        def attempt(index: int) -> None:
            ip = addresses[index]
            where = f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"
            d: defer.Deferred[Outbound] = defer.Deferred()
            current[0] = self._reactor.connectTCP(
                str(ip), port, _DialFactory(d, self.connections), timeout=self._timeout
            )

            def failed(failure: Failure) -> None:
                if result.called:
                    return
                if index + 1 < len(addresses):
                    attempt(index + 1)
                else:
                    result.errback(_classify(failure, where))

            def succeeded(proto: Outbound) -> None:
                current[0] = None
                if result.called:
                    proto.transport.abortConnection()
                else:
                    result.callback(proto)

            d.addCallbacks(succeeded, failed)

        attempt(0)
        return result
