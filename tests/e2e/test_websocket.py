"""
Websockets through a real proxy: a C{wsproto} client talks to a
C{websockets} echo server via an absolute-form C{ws://} upgrade and via
C{wss://} inside a CONNECT tunnel, 1,000 messages each, then closes cleanly.
"""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from websockets.sync.server import serve
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

MESSAGES = 1000


@pytest.fixture(params=[False, True], ids=["ws", "wss"])
def echo(request, tls_files):
    """
    A websocket echo server on 127.0.0.1, plain or TLS; yields C{(port, tls)}.
    """
    context = None
    if request.param:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_files.cert, tls_files.key)

    def handler(ws):
        for message in ws:
            ws.send(message)

    server = serve(handler, "127.0.0.1", 0, ssl=context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1], request.param
    server.shutdown()
    thread.join(10)


class Client:
    """
    A blocking wsproto client over an already connected socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list = []

    def next_event(self):
        while not self._events:
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    self.sock.sendall(self.ws.send(event.response()))
                else:
                    self._events.append(event)
        return self._events.pop(0)

    def handshake(self, host: str, target: str):
        self.sock.sendall(self.ws.send(Request(host=host, target=target)))
        return self.next_event()

    def echo(self, text: str) -> str:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))
        parts = []
        while True:
            event = self.next_event()
            assert isinstance(event, TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts)

    def close(self) -> tuple[int, bytes]:
        """
        Send a close frame; return the peer's close code and what followed
        it before EOF (nothing, for a clean close).
        """
        self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        event = self.next_event()
        assert isinstance(event, CloseConnection), event
        return event.code, self.sock.recv(65536)


def _connect(proxy, port: int, tls: bool, tls_files, proxyproc) -> Client:
    if not tls:
        sock = socket.create_connection(proxy.http_addr, timeout=30)
        client = Client(sock)
        event = client.handshake(f"127.0.0.1:{port}", f"ws://127.0.0.1:{port}/echo")
    else:
        sock, rest = proxyproc.open_tunnel(proxy.http_addr, f"localhost:{port}")
        assert rest == b""
        context = ssl.create_default_context(cafile=str(tls_files.cert))
        client = Client(context.wrap_socket(sock, server_hostname="localhost"))
        event = client.handshake(f"localhost:{port}", "/echo")
    assert isinstance(event, AcceptConnection), event
    return client


def test_thousand_messages_and_a_clean_close(proxy, echo, tls_files, proxyproc):
    port, tls = echo
    client = _connect(proxy, port, tls, tls_files, proxyproc)

    for i in range(MESSAGES):
        text = f"message {i} " + "x" * (i % 50)
        assert client.echo(text) == text

    assert client.close() == (1000, b"")
    client.sock.close()


def test_upgrade_in_limited_mode_is_403(proxy_factory):
    proxy = proxy_factory({"mode": "limited"})
    sock = socket.create_connection(proxy.http_addr, timeout=30)
    client = Client(sock)

    event = client.handshake("127.0.0.1:9", "ws://127.0.0.1:9/echo")

    assert isinstance(event, RejectConnection), event
    assert event.status_code == 403
    assert (b"x-proxy-error", b"blocked-by-method-policy") in event.headers
    sock.close()
