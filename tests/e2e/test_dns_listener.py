"""
The DNS listener (SPEC §14.2) of a real C{twistd codexproxy} process, asked
over UDP and TCP like a sandbox's stub resolver would: an answer for an
allowed name pinned with C{--resolve}, REFUSED for an unlisted name (never
looked up) and for a name pinned to a private address, one audit event each.
"""

from __future__ import annotations

import json
import socket

import pytest
from twisted.names import dns

PUBLIC = "198.51.99.7"


def _query(name: str, kind: int, ident: int) -> bytes:
    message = dns.Message(id=ident, recDes=1)
    message.queries = [dns.Query(name, kind, dns.IN)]
    return message.toStr()


def _decode(data: bytes, ident: int) -> dns.Message:
    reply = dns.Message()
    reply.fromStr(data)
    assert (reply.id, reply.answer) == (ident, 1)
    return reply


def ask_udp(address: tuple[str, int], name: str, kind: int = dns.A) -> dns.Message:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(30)
        sock.sendto(_query(name, kind, 11), address)
        data, _ = sock.recvfrom(4096)
    return _decode(data, 11)


def ask_tcp(address: tuple[str, int], name: str, kind: int = dns.A) -> dns.Message:
    query = _query(name, kind, 12)
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(len(query).to_bytes(2, "big") + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            piece = sock.recv(4096)
            assert piece, data
            data += piece
    return _decode(data[2:], 12)


@pytest.fixture
def dns_proxy(proxy_factory):
    return proxy_factory(
        {
            "dns_url": "127.0.0.1:0",
            "allowed_domains": ["allowed.test", "private.test", "gone.invalid"],
        },
        args=(
            "--audit-log", "audit.jsonl",
            "--resolve", f"allowed.test={PUBLIC}",
            "--resolve", "private.test=10.0.0.5",
        ),
    )


def test_dns_listener_answers_allowed_names_only(dns_proxy):
    host, _, port = dns_proxy.ports["dns"].rpartition(":")
    address = (host, int(port))

    for ask in (ask_udp, ask_tcp):
        allowed = ask(address, "allowed.test")
        assert allowed.rCode == dns.OK
        assert [(rr.payload.dottedQuad(), rr.ttl) for rr in allowed.answers] == [(PUBLIC, 0)]
        assert ask(address, "unlisted.invalid").rCode == dns.EREFUSED
        assert ask(address, "private.test").rCode == dns.EREFUSED
    assert ask_udp(address, "allowed.test", dns.MX).rCode == dns.EREFUSED
    assert ask_udp(address, "allowed.test", dns.AAAA).answers == []

    dns_proxy.stop()  # flushes the audit log
    events = [
        json.loads(line)
        for line in (dns_proxy.workdir / "audit.jsonl").read_text().splitlines()
    ]
    assert [
        (e["network.transport.protocol"], e["server.address"], e["network.policy.decision"],
         e.get("network.policy.reason"))
        for e in events
    ] == [
        ("dns", "allowed.test", "allow", "allowed"),
        ("dns", "unlisted.invalid", "deny", "not_allowed"),
        ("dns", "private.test", "deny", "not_allowed_local"),
    ] * 2 + [("dns", "allowed.test", "allow", "allowed")]


def test_dns_listener_port_is_in_the_ports_file_and_nothing_else_changes(proxy_factory):
    proxy = proxy_factory({"dns_url": "127.0.0.1:0"})
    assert set(proxy.ports) == {"http", "dns"}
    assert proxy.ports["dns"].startswith("127.0.0.1:")
    assert proxy.ports["dns"] != proxy.ports["http"]


def _udp_taken_tcp_free() -> socket.socket:
    """
    A UDP socket bound to a port whose TCP side is free, so that only the
    UDP bind can fail (other tests hold ephemeral TCP ports meanwhile).
    """
    for _ in range(50):
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        taken.bind(("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", taken.getsockname()[1]))
                return taken
            except OSError:
                taken.close()
    raise AssertionError("no UDP port with a free TCP side in 50 tries")


def test_dns_port_taken_for_udp_aborts_start_up(proxyproc, tmp_path):
    with _udp_taken_tcp_free() as taken:
        port = taken.getsockname()[1]
        done = proxyproc.run_to_exit({"dns_url": f"127.0.0.1:{port}"}, tmp_path)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (dns_url) for UDP" in done.stderr + done.stdout
    assert not (tmp_path / "ports.json").exists()
