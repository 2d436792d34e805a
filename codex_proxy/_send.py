"""
Writing a head or a small response at once: Twisted's C{transport.write}
only buffers, registers the socket for writability with epoll, sends from
the next reactor turn and unregisters it again: two C{epoll_ctl} calls and
a reactor pass for every write. A plain TCP socket with nothing buffered
takes the bytes now instead, and only what the kernel does not take is
left to the transport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def send(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: straight to its socket when it is plain
    TCP (no TLS), open, and has nothing buffered, the rest (or all, for any
    other transport) through C{transport.write}, so the order of bytes and
    Twisted's back-pressure are kept.
    """
    if (
        type(transport) is tcp.Client or type(transport) is tcp.Server
    ) and not (
        transport.TLS
        or transport.disconnecting
        or transport._writeDisconnecting
        or not transport.connected
        or transport._tempDataLen
        or len(transport.dataBuffer) > transport.offset
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Would block, or broken: the transport finds out and reports.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
