"""
Named clients of the proxy (SPEC §11): the C{[network.clients.NAME]}
tables read into L{Client}s, and the L{Credentials} that tell which client a
connection is from.

Pure core: values in, values out. Tokens are compared in constant time
against every client without an early exit, and never appear in a
message, a C{repr} or an error: only client names do, and a name is
restricted to a charset that is safe as an audit value and a metrics label.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from typing import Mapping, Optional

import attrs

from codex_proxy._toml import Table, pattern_lists, readonly
from codex_proxy.model import Mode

#: What a client name may be: it becomes an audit value and a metrics label.
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CLIENT_KEYS = ("token", "token_file", "allowed_domains", "denied_domains", "mode")
#: The keys of the network section read here.
CLIENT_KEYS = ("clients", "require_client_auth")


@attrs.frozen
class Client:
    """
    One named client: its token and its additions to the base policy.

    @ivar allowed_domains: canonical patterns allowed for this client only,
        without the ones it also denies.
    @ivar denied_domains: canonical patterns denied for this client only.
    @ivar mode: the client's own mode, never less strict than the base's;
        C{None} when it does not set one.
    @ivar pattern_sources: pattern -> C{"file: dotted.key[index]"}.
    """

    name: str
    token: str = attrs.field(repr=False)
    allowed_domains: tuple[str, ...] = ()
    denied_domains: tuple[str, ...] = ()
    mode: Optional[Mode] = None
    pattern_sources: Mapping[str, str] = attrs.field(
        factory=dict, converter=readonly, hash=False
    )


def parse_clients(network: Table, base_mode: Mode) -> tuple[tuple[Client, ...], bool]:
    """
    The C{clients} table of the network section C{network}, in file order,
    and its C{require_client_auth} (true by default when there are clients).

    @param base_mode: the section's own mode; a client may only be stricter.
    @raise codex_proxy._toml.ConfigError: a bad name, an unknown key, a
        missing or weak token, a token another client has, a malformed
        pattern, a client mode less strict than the base's (naming both
        keys), or C{require_client_auth} without clients.
    """
    table = network.table("clients")
    clients: list[Client] = []
    for name in table.values:
        if not NAME.fullmatch(name):
            raise table.error(
                table.key(name),
                "a client name is 1 to 64 characters of A-Z a-z 0-9 . _ -",
            )
        entry = table.table(name)
        entry.check_keys(_CLIENT_KEYS)
        token = entry.token("token", "token_file")
        if token is None:
            raise entry.error(entry.key("token"), "a client needs token or token_file")
        mode = entry.mode("mode")
        if mode is Mode.FULL and base_mode is Mode.LIMITED:
            raise entry.error(
                entry.key("mode"),
                "'full' is less strict than the base "
                f"{network.key('mode')} = 'limited'; a client may only be stricter",
            )
        for other in clients:
            if hmac.compare_digest(other.token.encode("utf-8"), token.encode("utf-8")):
                # Bearer tokens name no client: each must tell one apart.
                raise entry.error(
                    entry.key("token"), f"the same token as client {other.name!r}"
                )
        allowed, denied = pattern_lists(entry)
        clients.append(
            Client(name, token, tuple(allowed), tuple(denied), mode, {**allowed, **denied})
        )
    required = network.boolean("require_client_auth", bool(clients))
    if required and not clients:
        raise network.error(
            network.key("require_client_auth"),
            "true, but no [clients] are configured: nothing could authenticate",
        )
    return tuple(clients), required


def named(clients: tuple[Client, ...], name: str) -> Optional[Client]:
    """
    The client called C{name}, if configured.
    """
    return next((client for client in clients if client.name == name), None)


def stricter(base: Mode, client: Optional[Mode]) -> Mode:
    """
    The stricter of the base mode and a client's.
    """
    return Mode.LIMITED if Mode.LIMITED in (base, client) else Mode.FULL


@attrs.frozen
class Credentials:
    """
    The tokens of the configured clients, compiled once per policy.

    @ivar tokens: C{(name, token)} pairs as bytes.
    @ivar required: anonymous connections are refused (C{require_client_auth}).
    """

    tokens: tuple[tuple[bytes, bytes], ...] = attrs.field(default=(), repr=False)
    required: bool = False

    @classmethod
    def of(cls, clients: tuple[Client, ...], required: bool) -> Credentials:
        return cls(
            tuple((c.name.encode("utf-8"), c.token.encode("utf-8")) for c in clients),
            required,
        )

    @property
    def configured(self) -> bool:
        """
        Whether any client is configured: then credentials are checked.
        """
        return bool(self.tokens)

    def verify(self, name: Optional[bytes], token: bytes) -> Optional[str]:
        """
        The name of the client whose token is C{token} (and whose name is
        C{name}, unless C{None}), or C{None}. Every client is compared, in
        constant time each, so the time taken tells nothing about which
        part matched.
        """
        found: Optional[bytes] = None
        for client, secret in self.tokens:
            same_token = hmac.compare_digest(token, secret)
            same_name = name is None or hmac.compare_digest(name, client)
            if same_token & same_name:
                found = client
        return None if found is None else found.decode("utf-8")

    def http(self, authorization: Optional[bytes]) -> tuple[bool, Optional[str]]:
        """
        Whether a request with this C{Proxy-Authorization} value may go on,
        and as which client: C{Basic base64(NAME:TOKEN)} or C{Bearer TOKEN}.
        Credentials that are given but wrong never pass, even when
        anonymous access is allowed (fail closed).
        """
        if not self.tokens:
            return True, None
        if authorization is None:
            return not self.required, None
        scheme, _, value = authorization.strip().partition(b" ")
        scheme, value = scheme.lower(), value.strip()
        name: Optional[bytes] = None
        if scheme == b"basic":
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return False, None
            name, colon, value = decoded.partition(b":")
            if not colon:
                return False, None
        elif scheme != b"bearer":
            return False, None
        identity = self.verify(name, value)
        return identity is not None, identity

    def socks(self, username: str, password: bytes) -> tuple[bool, Optional[str]]:
        """
        Whether an RFC 1929 sub-negotiation passes, and the identity it
        gives: without clients the username is a label, not a secret; with
        them it must name the client whose token is C{password}.
        """
        if not self.tokens:
            return True, username
        identity = self.verify(username.encode("utf-8"), password)
        return identity is not None, identity
