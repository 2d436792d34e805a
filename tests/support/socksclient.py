"""
A blocking SOCKS5 client for the end-to-end tests: the proxy options that
enable the SOCKS5 listener, and one no-auth request over a real socket.
"""

from __future__ import annotations

import socket
import struct

SOCKS = {"enable_socks5": True, "socks_url": "127.0.0.1:0"}


def socks_address(host: str, port: int) -> bytes:
    try:
        packed = socket.inet_aton(host) if host.count(".") == 3 else None
    except OSError:
        packed = None
    if packed is not None:
        return b"\x01" + packed + struct.pack("!H", port)
    return b"\x03" + bytes([len(host)]) + host.encode() + struct.pack("!H", port)


def socks_request(
    addr: tuple[str, int], command: int, host: str, port: int
) -> tuple[socket.socket, int, tuple[str, int]]:
    """
    Greet with no-auth and send one request; return the socket, the REP code
    and BND.ADDR/BND.PORT (IPv4 replies only, which is all we bind).
    """
    sock = socket.create_connection(addr, timeout=30)
    sock.sendall(b"\x05\x01\x00" + b"\x05" + bytes([command, 0]) + socks_address(host, port))
    assert _recv_exactly(sock, 2) == b"\x05\x00"
    head = _recv_exactly(sock, 4)
    assert head[0] == 5 and head[3] == 1, head
    bound = _recv_exactly(sock, 6)
    return sock, head[1], (socket.inet_ntoa(bound[:4]), struct.unpack("!H", bound[4:])[0])


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            raise ConnectionError(f"closed after {data!r}")
        data += piece
    return data
