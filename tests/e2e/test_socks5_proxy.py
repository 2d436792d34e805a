"""
The SOCKS5 listener of a real C{twistd codexproxy} process, driven by curl
and a Python client: a tunnel to an allowlisted origin, blocks by REP code,
a UDP echo through the relay, a denied datagram, limited mode.
"""

from __future__ import annotations

import json

import socket
import threading
from typing import Iterator

import pytest

from support.socksclient import SOCKS, socks_address, socks_request

class UDPEcho:
    """
    A loopback UDP server that records and echoes every datagram.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            if self._stopping:
                return
            self.received.append(data)
            self.sock.sendto(b"echo:" + data, peer)

    def close(self) -> None:
        # A datagram to itself wakes the blocked recvfrom (close alone does not).
        self._stopping = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", ("127.0.0.1", self.port))
        self._thread.join(10)
        self.sock.close()


@pytest.fixture
def udp_echo() -> Iterator[UDPEcho]:
    echo = UDPEcho()
    yield echo
    echo.close()


@pytest.fixture
def socks_proxy(proxy_factory):
    return proxy_factory(SOCKS, args=("--audit-log", "audit.jsonl"))


def test_curl_socks5_hostname_reaches_allowlisted_origin(
    socks_proxy, origin, curl, proxyproc
):
    """
    curl resolves nothing itself (socks5h): the proxy decides on the name
    C{localhost}, which is allowlisted exactly, and the bytes arrive intact.
    """
    result = curl.run(
        origin.url("/bytes/100000", host="localhost"),
        proxy=f"socks5h://{socks_proxy.ports['socks']}",
    )

    assert (result.returncode, result.status) == (0, 200), result.stderr
    assert result.body == proxyproc.pattern_bytes(100000)
    assert [seen.path for seen in origin.requests] == ["/bytes/100000"]
    socks_proxy.stop()  # flushes the audit log
    events = [json.loads(line) for line in (socks_proxy.workdir / "audit.jsonl").read_text().splitlines()]
    assert [
        (e["network.policy.decision"], e["network.transport.protocol"], e["server.address"], e["server.port"])
        for e in events
    ] == [("allow", "socks5_tcp", "localhost", origin.port)]


def test_non_allowlisted_name_is_not_allowed(socks_proxy, curl):
    """
    A name on no list gets REP 0x02, curl reports the ruleset refusal, and
    the audit event's reason is C{not_allowed}: decided before any lookup,
    so the name is never resolved.
    """
    result = curl.run(
        "http://blocked.invalid/", proxy=f"socks5h://{socks_proxy.ports['socks']}"
    )
    sock, rep, _ = socks_request(socks_proxy.socks_addr, 1, "blocked.invalid", 443)
    with sock:
        assert sock.recv(1) == b""

    assert rep == 0x02
    assert result.returncode == 97, result.stderr
    assert "(2)" in result.stderr, result.stderr  # curl names the REP code
    socks_proxy.wait_for_line("deny (not_allowed) for socks5_tcp blocked.invalid:443")
    assert "upstream_dns_failed" not in socks_proxy.output


def _associate(proxy) -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    """
    UDP ASSOCIATE from a fresh UDP socket; return the control connection,
    the UDP socket and the relay address.
    """
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(30)
    control, rep, relay = socks_request(
        proxy.socks_addr, 3, "127.0.0.1", udp.getsockname()[1]
    )
    assert rep == 0
    return control, udp, relay


def _datagram(host: str, port: int, payload: bytes) -> bytes:
    return b"\x00\x00\x00" + socks_address(host, port) + payload


def test_udp_echo_through_the_relay(socks_proxy, udp_echo):
    """
    The relay is reported on the listener's IP, datagrams reach the echo
    server and its answers come back with a SOCKS5 UDP header.
    """
    control, udp, relay = _associate(socks_proxy)
    with control, udp:
        assert relay[0] == "127.0.0.1"
        udp.sendto(_datagram("127.0.0.1", udp_echo.port, b"hello"), relay)
        data, source = udp.recvfrom(65535)

    assert source == relay
    assert data == _datagram("127.0.0.1", udp_echo.port, b"echo:hello")
    assert udp_echo.received == [b"hello"]


def test_udp_to_non_allowlisted_destination_gets_no_reply(socks_proxy, udp_echo):
    """
    A datagram to a denied destination is dropped with a deny audit event;
    the association stays and the next allowed datagram is answered (the
    relay handles datagrams in order, so the first one got no reply).
    """
    control, udp, relay = _associate(socks_proxy)
    with control, udp:
        udp.sendto(_datagram("blocked.invalid", udp_echo.port, b"secret"), relay)
        udp.sendto(_datagram("127.0.0.1", udp_echo.port, b"allowed"), relay)
        data, _ = udp.recvfrom(65535)

    assert data.endswith(b"echo:allowed")
    assert udp_echo.received == [b"allowed"]
    socks_proxy.wait_for_line(
        f"deny (not_allowed) for socks5_udp blocked.invalid:{udp_echo.port}"
    )


def test_limited_mode_blocks_socks5(proxy_factory, origin):
    """
    Limited mode refuses SOCKS5 CONNECT and UDP ASSOCIATE with REP 0x02.
    """
    proxy = proxy_factory({**SOCKS, "mode": "limited"})

    tcp, tcp_rep, _ = socks_request(proxy.socks_addr, 1, "127.0.0.1", origin.port)
    udp, udp_rep, _ = socks_request(proxy.socks_addr, 3, "127.0.0.1", 0)
    tcp.close()
    udp.close()

    assert (tcp_rep, udp_rep) == (0x02, 0x02)
    assert origin.requests == []
    proxy.wait_for_line("deny (method_not_allowed) for socks5_tcp 127.0.0.1")
