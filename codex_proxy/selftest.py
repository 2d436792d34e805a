"""
C{codexproxy selftest}: replay the bypass corpus (L{codex_proxy.bypass})
against a running proxy and report, per case, what each path answered.

The requests and the judging are pure functions of bytes, shared with the
in-memory tests, so both replay exactly the same thing. The live runner is
a plain blocking client: it is a command, not part of the reactor.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import attrs

from codex_proxy.bypass import INVALID, OUTCOMES, Case, Corpus

#: The probes of one case, in order: HTTP absolute-form, CONNECT, SOCKS5
#: with a domain ATYP, SOCKS5 with an IP ATYP (IP literals only).
HTTP, CONNECT, SOCKS5, SOCKS5_IP = "http", "connect", "socks5", "socks5-ip"

_MAX_HEAD = 65536


@attrs.frozen
class Outcome:
    """
    What one probe of a case saw, and whether that is what the case expects.
    """

    probe: str
    ok: bool
    seen: str


def authority(case: Case, port: int) -> str:
    """
    C{host:port} as the request line and C{Host} carry it, host as sent.
    """
    return f"{case.host}:{port}"


def http_request(case: Case, port: int) -> bytes:
    """
    An absolute-form GET for the case's host, with a matching C{Host}.
    """
    target = authority(case, port)
    return (
        f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


def connect_request(case: Case, port: int) -> bytes:
    target = authority(case, port)
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode("ascii")


def socks_request(case: Case, port: int, by_ip: bool) -> bytes:
    """
    The no-auth greeting and a CONNECT request: the host as a domain ATYP
    (sent as is, brackets and all), or its address as an IP ATYP.
    """
    if by_ip:
        ip = case.literal
        assert ip is not None, f"{case.name}: not an IP literal"
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    else:
        name = case.host.encode("utf-8")
        address = b"\x03" + bytes([len(name)]) + name
    return b"\x05\x01\x00" + b"\x05\x01\x00" + address + struct.pack("!H", port)


def parse_http_response(raw: bytes) -> Tuple[int, Dict[str, str], bytes]:
    """
    Status, lower-cased headers and body of one response.

    @raise ValueError: C{raw} holds no complete status line and head.
    """
    head, separator, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not separator or len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {raw[:80]!r}")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers, body


def judge_http(case: Case, probe: str, raw: bytes) -> Outcome:
    """
    Whether an HTTP or CONNECT answer is the case's expected refusal: the
    status, and for blocks the C{x-proxy-error} value.
    """
    try:
        status, headers, body = parse_http_response(raw)
    except ValueError as e:
        return Outcome(probe, False, str(e))
    header = headers.get("x-proxy-error")
    seen = f"{status} {header or '-'}"
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        reason = None
    if reason:
        seen += f" ({reason})"
    want_status = OUTCOMES[case.expect][0]
    want_header = None if case.expect == INVALID else case.expect
    ok = status == want_status and (want_header is None or header == want_header)
    if not ok:
        seen += f", expected {want_status}" + (f" {want_header}" if want_header else "")
    return Outcome(probe, ok, seen)


def judge_socks(case: Case, probe: str, raw: bytes) -> Outcome:
    """
    Whether a SOCKS5 exchange (method choice, then the reply) carries the
    case's expected REP code.
    """
    if raw[:2] != b"\x05\x00" or len(raw) < 4 or raw[2] != 5:
        return Outcome(probe, False, f"not a SOCKS5 no-auth exchange: {raw[:12]!r}")
    rep = raw[3]
    want = OUTCOMES[case.expect][1]
    seen = f"REP 0x{rep:02x}"
    return Outcome(probe, rep == want, seen if rep == want else f"{seen}, expected 0x{want:02x}")


def probes(case: Case, socks: bool) -> List[str]:
    """
    The probes that apply to C{case}: IP ATYP only for literals, SOCKS5
    only when there is a SOCKS5 listener.
    """
    found = [HTTP, CONNECT]
    if socks:
        found.append(SOCKS5)
        if case.literal is not None:
            found.append(SOCKS5_IP)
    return found


def request_for(case: Case, probe: str, port: int) -> bytes:
    """
    The bytes a client sends for one probe of C{case}.
    """
    if probe == HTTP:
        return http_request(case, port)
    if probe == CONNECT:
        return connect_request(case, port)
    return socks_request(case, port, by_ip=probe == SOCKS5_IP)


def judge(case: Case, probe: str, raw: bytes) -> Outcome:
    """
    Judge what the listener answered to one probe of C{case}.
    """
    if probe in (HTTP, CONNECT):
        return judge_http(case, probe, raw)
    return judge_socks(case, probe, raw)


# -- the live runner ------------------------------------------------------------


def _recv_http(sock: socket.socket) -> bytes:
    """
    One response: the head, then the body by C{Content-Length} (or to EOF).
    """
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
        if len(data) > _MAX_HEAD:
            return data
    try:
        _, headers, body = parse_http_response(data)
    except ValueError:
        return data
    wanted = int(headers.get("content-length", "-1"))
    while wanted < 0 or len(body) < wanted:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
        data += piece
    return data


def _recv_socks(sock: socket.socket) -> bytes:
    """
    The method choice and the reply header (enough to read REP).
    """
    data = b""
    while len(data) < 4:
        piece = sock.recv(4 - len(data))
        if not piece:
            break
        data += piece
        if data[:2] != b"\x05\x00" and len(data) >= 2:
            break
    return data


def exchange(address: Tuple[str, int], probe: str, data: bytes, timeout: float) -> bytes:
    """
    Send one probe's bytes to the listener at C{address}; the answer.

    @raise OSError: the listener cannot be reached or did not answer in time.
    """
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        return _recv_http(sock) if probe in (HTTP, CONNECT) else _recv_socks(sock)


@attrs.frozen
class Target:
    """
    The running proxy: its listeners, and the destination port requests ask
    for (point it at a local port you watch to see that nothing arrives).
    """

    http: Tuple[str, int]
    socks: Optional[Tuple[str, int]]
    port: int = 80
    timeout: float = 10.0


def run(
    corpus: Corpus,
    target: Target,
    with_resolve: bool,
    out: TextIO,
    send: Callable[[Tuple[str, int], str, bytes, float], bytes] = exchange,
) -> Tuple[int, int]:
    """
    Replay every case that can run against C{target}, one line per case;
    returns (passed, failed). Resolver cases run only C{with_resolve} (the
    proxy must have been started with L{Corpus.resolve_entries}); cases with
    public answers never run live.
    """
    passed = failed = skipped = 0
    for case in corpus.cases:
        label = f"{case.name} ({case.host})"
        if not case.live:
            skipped += 1
            out.write(f"skip  {label}: public answers or rebinding, replayed in memory only\n")
            continue
        if case.answers and not with_resolve:
            skipped += 1
            out.write(f"skip  {label}: needs resolver answers (--with-resolve)\n")
            continue
        outcomes = []
        for probe in probes(case, target.socks is not None):
            address = target.socks if probe in (SOCKS5, SOCKS5_IP) else target.http
            assert address is not None
            try:
                raw = send(address, probe, request_for(case, probe, target.port), target.timeout)
            except OSError as e:
                outcomes.append(Outcome(probe, False, f"no answer: {e}"))
                continue
            outcomes.append(judge(case, probe, raw))
        ok = all(outcome.ok for outcome in outcomes)
        passed += ok
        failed += not ok
        details = ", ".join(f"{o.probe} {o.seen}" for o in outcomes)
        out.write(f"{'pass' if ok else 'FAIL'}  {label}: {details}\n")
    summary = f"{passed} passed, {failed} failed"
    out.write(summary + (f", {skipped} skipped\n" if skipped else "\n"))
    return passed, failed


def parse_address(text: str, what: str) -> Tuple[str, int]:
    """
    C{host:port} or a URL's authority (C{http://127.0.0.1:3128}).

    @raise ValueError: no port, or not C{host:port}.
    """
    rest = text.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"{what}: expected host:port or http://host:port, got {text!r}")
    return host, int(port)


def resolve_options(corpus: Corpus) -> Sequence[str]:
    """
    The plugin options that give a proxy the corpus's resolver answers.
    """
    return [f"--resolve={entry}" for entry in corpus.resolve_entries()]
