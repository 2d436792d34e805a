"""
The pure half of secrets (SPEC §12): the C{[network.secrets.NAME]} tables,
the placeholder syntax, and finding and replacing placeholders in request
header fields. The values themselves live in L{codex_proxy.secrets} only.

Only header values are looked at, never bodies or the URL: one substring
test per value for the prefix every placeholder shares, plus a Basic
credential's decoded form.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Mapping, Optional, Tuple

import attrs

from codex_proxy._httpfields import Headers
from codex_proxy._toml import Table, is_str

#: What every placeholder starts with.
PREFIX = b"codexproxy-secret-"
#: A secret's name: what an environment variable may be called.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER = re.compile(rb"codexproxy-secret-([A-Za-z_][A-Za-z0-9_]*)-[0-9a-f]{32}")
_SOURCES = ("env:", "file:")
_BASIC = b"basic "
_PROXY_AUTHORIZATION = b"proxy-authorization"


@attrs.frozen
class SecretConfig:
    """
    One C{[network.secrets.NAME]} table: where the value comes from and
    the hosts it may go to. It never holds the value.

    @ivar source: C{"env:VAR"} or C{"file:/absolute/path"}.
    @ivar hosts: canonical pattern texts (SPEC §3).
    @ivar file: the config file, for messages.
    @ivar key: the dotted key of the table, for messages.
    """

    name: str
    source: str
    hosts: Tuple[str, ...]
    file: str
    key: str


def parse_secrets(network: Table) -> Tuple[SecretConfig, ...]:
    """
    The secrets table of the network section, in file order.

    @raise codex_proxy._toml.ConfigError: naming the secret and the key.
    """
    secrets = network.table("secrets")
    found = []
    for name in secrets.values:
        table = secrets.table(name)
        if not _NAME.match(name):
            raise secrets.error(
                table.path, "a secret's name must be a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
            )
        table.check_keys(("source", "hosts"))
        source = table.get("source", None, is_str, "a string")
        if source is None or not source.startswith(_SOURCES) or source in _SOURCES:
            raise table.error(
                table.key("source"), "expected 'env:VARIABLE' or 'file:/absolute/path'"
            )
        if source.startswith("file:") and not source[5:].startswith("/"):
            raise table.error(table.key("source"), f"the file of {source!r} must be an absolute path")
        hosts = tuple(dict.fromkeys(table.pattern(text, key) for text, key in table.strings("hosts")))
        if not hosts:
            raise table.error(table.key("hosts"), "name at least one host the secret may be sent to")
        found.append(SecretConfig(name, source, hosts, network.source, table.path))
    return tuple(found)


def placeholder(name: str, token: str) -> str:
    """
    The placeholder of secret C{name}: C{codexproxy-secret-NAME-<token>}
    with C{token} 32 lowercase hex characters.
    """
    return f"codexproxy-secret-{name}-{token}"


def _basic(value: bytes) -> Optional[bytes]:
    """
    The decoded credentials of a C{Basic} field value, if it is one.
    """
    if value[:6].lower() != _BASIC:
        return None
    try:
        return base64.b64decode(value[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def named(headers: Headers) -> Tuple[str, ...]:
    """
    The names of the secrets whose placeholders appear in the values of
    C{headers} (in a Basic credential too), C{Proxy-Authorization} aside:
    that one is for this proxy and never forwarded.
    """
    names: dict[str, None] = {}
    for field, value in headers:
        if PREFIX in value:
            text = value
        elif value[:6].lower() == _BASIC:
            decoded = _basic(value)
            if decoded is None or PREFIX not in decoded:
                continue
            text = decoded
        else:
            continue
        if field.lower() != _PROXY_AUTHORIZATION:
            names.update(dict.fromkeys(m.decode("ascii") for m in _PLACEHOLDER.findall(text)))
    return tuple(names)


def substitute(headers: Headers, replacements: Mapping[bytes, bytes]) -> Headers:
    """
    C{headers} with each placeholder of C{replacements} replaced by its
    value, in plain values and inside Basic credentials (decoded, replaced,
    encoded again); every other field and byte stays as it was.
    """
    out = []
    for field, value in headers:
        if PREFIX in value:
            for old, new in replacements.items():
                value = value.replace(old, new)
        else:
            decoded = _basic(value)
            if decoded is not None and PREFIX in decoded:
                for old, new in replacements.items():
                    decoded = decoded.replace(old, new)
                value = value[:6] + base64.b64encode(decoded)
        out.append((field, value))
    return tuple(out)
