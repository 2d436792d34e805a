"""
Sans-IO SOCKS5 messages (RFC 1928) and username/password sub-negotiation
(RFC 1929).

Each C{parse_*} function takes the bytes received so far and returns
C{None} while the message is incomplete, or C{(message, rest)}. Every
message has a bounded size (L{MAX_GREETING}, L{MAX_AUTH}, L{MAX_REQUEST}):
a buffer that long always parses or raises, so a listener never holds more
than one message. Malformed input raises L{SocksProtocolError}, which
carries the REP code a request error is answered with.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import FrozenSet, Optional, Tuple

import attrs

from codex_proxy.errors import (
    SOCKS_ADDRESS_TYPE_NOT_SUPPORTED,
    SOCKS_GENERAL_FAILURE,
    ProtocolError,
)

VERSION = 5
AUTH_VERSION = 1

# Methods (RFC 1928 §3).
METHOD_NO_AUTH = 0x00
METHOD_USERNAME_PASSWORD = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

# Commands (RFC 1928 §4).
CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

# Address types.
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00

#: VER NMETHODS METHODS[255]
MAX_GREETING = 2 + 255
#: VER ULEN UNAME[255] PLEN PASSWD[255]
MAX_AUTH = 3 + 255 + 255
#: VER CMD RSV ATYP LEN DOMAIN[255] PORT
MAX_REQUEST = 4 + 1 + 255 + 2


class SocksProtocolError(ProtocolError):
    """
    The client broke the SOCKS5 wire format.

    @ivar reply: the REP code to answer a request with (RFC 1928 §6).
    """

    def __init__(self, message: str, reply: int = SOCKS_GENERAL_FAILURE) -> None:
        super().__init__(message)
        self.reply = reply


@attrs.frozen
class Greeting:
    """
    The methods a client offers.
    """

    methods: FrozenSet[int]


@attrs.frozen
class Credentials:
    """
    An RFC 1929 username and password. The password is never shown.
    """

    username: str
    password: bytes = attrs.field(repr=False)


@attrs.frozen
class Request:
    """
    A request: C{host} is an IP literal or a name as the client sent it.
    """

    command: int
    host: str
    port: int


@attrs.frozen
class Datagram:
    """
    One UDP datagram of an association (RFC 1928 §7).
    """

    frag: int
    host: str
    port: int
    payload: bytes = attrs.field(repr=False)


def parse_greeting(data: bytes) -> Optional[Tuple[Greeting, bytes]]:
    if not data:
        return None
    if data[0] != VERSION:
        raise SocksProtocolError(f"not a SOCKS5 greeting (version byte {data[0]:#04x})")
    if len(data) < 2:
        return None
    count = data[1]
    if count == 0:
        raise SocksProtocolError("SOCKS5 greeting offers no method")
    end = 2 + count
    if len(data) < end:
        return None
    return Greeting(frozenset(data[2:end])), data[end:]


def parse_auth(data: bytes) -> Optional[Tuple[Credentials, bytes]]:
    if not data:
        return None
    if data[0] != AUTH_VERSION:
        raise SocksProtocolError(
            f"not an RFC 1929 sub-negotiation (version byte {data[0]:#04x})"
        )
    if len(data) < 2:
        return None
    ulen = data[1]
    if len(data) < 3 + ulen:
        return None
    plen = data[2 + ulen]
    end = 3 + ulen + plen
    if len(data) < end:
        return None
    try:
        username = data[2 : 2 + ulen].decode("utf-8")
    except UnicodeDecodeError:
        raise SocksProtocolError("RFC 1929 username is not UTF-8") from None
    return Credentials(username, data[3 + ulen : end]), data[end:]


def _parse_address(data: bytes, at: int) -> Optional[Tuple[str, int, int]]:
    """
    ATYP, address and port starting at offset C{at}: C{(host, port, end)},
    or C{None} when incomplete.
    """
    if len(data) <= at:
        return None
    atyp = data[at]
    if atyp == ATYP_IPV4:
        end = at + 1 + 4
        if len(data) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(data[at + 1 : end]))
    elif atyp == ATYP_IPV6:
        end = at + 1 + 16
        if len(data) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(data[at + 1 : end]))
    elif atyp == ATYP_DOMAIN:
        if len(data) <= at + 1:
            return None
        end = at + 2 + data[at + 1]
        if len(data) < end + 2:
            return None
        try:
            host = data[at + 2 : end].decode("utf-8")
        except UnicodeDecodeError:
            raise SocksProtocolError("SOCKS5 domain name is not UTF-8") from None
    else:
        raise SocksProtocolError(
            f"unsupported SOCKS5 address type {atyp:#04x}",
            SOCKS_ADDRESS_TYPE_NOT_SUPPORTED,
        )
    (port,) = struct.unpack_from("!H", data, end)
    return host, port, end + 2


def parse_request(data: bytes) -> Optional[Tuple[Request, bytes]]:
    if not data:
        return None
    if data[0] != VERSION:
        raise SocksProtocolError(f"not a SOCKS5 request (version byte {data[0]:#04x})")
    if len(data) < 3:
        return None
    if data[2] != 0:
        raise SocksProtocolError(f"SOCKS5 request reserved byte is {data[2]:#04x}")
    address = _parse_address(data, 3)
    if address is None:
        return None
    host, port, end = address
    return Request(data[1], host, port), data[end:]


def parse_datagram(data: bytes) -> Datagram:
    """
    A whole UDP datagram (its header is never split).
    """
    if len(data) < 4:
        raise SocksProtocolError(f"SOCKS5 UDP datagram of {len(data)} bytes is too short")
    if data[0:2] != b"\x00\x00":
        raise SocksProtocolError("SOCKS5 UDP datagram reserved bytes are not zero")
    address = _parse_address(data, 3)
    if address is None:
        raise SocksProtocolError("SOCKS5 UDP datagram header is truncated")
    host, port, end = address
    return Datagram(data[2], host, port, data[end:])


def _encode_address(host: str, port: int) -> bytes:
    """
    ATYP, address and port of an IP literal.
    """
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([atyp]) + ip.packed + struct.pack("!H", port)


def encode_method(method: int) -> bytes:
    return bytes([VERSION, method])


def encode_auth_status(ok: bool) -> bytes:
    return bytes([AUTH_VERSION, 0x00 if ok else 0x01])


def encode_reply(reply: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """
    A reply to a request; C{host} (an IP literal) and C{port} are BND.ADDR
    and BND.PORT.
    """
    return bytes([VERSION, reply, 0]) + _encode_address(host, port)


def encode_datagram(host: str, port: int, payload: bytes) -> bytes:
    """
    A UDP datagram to the client from C{host} (an IP literal) and C{port}.
    """
    return b"\x00\x00\x00" + _encode_address(host, port) + payload
