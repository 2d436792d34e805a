"""
Secrets the sandbox never sees (SPEC §12): each configured secret's
placeholder, its value, and putting the value in place of the placeholder
in the header fields of a request to one of the secret's hosts.

Placeholders are random at each start and stay the same for the life of the
process, so running children keep working when a reload rotates the values.
A value leaves this module only into an outgoing header: no message, log
line or C{repr} names it (the placeholders and names are no secrets).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, Mapping, Tuple

import attrs
from twisted.logger import Logger

from codex_proxy import _placeholders
from codex_proxy._httphead import RequestHead
from codex_proxy._placeholders import SecretConfig
from codex_proxy._toml import ConfigError, read_private_file
from codex_proxy.domains import DomainSet, parse_pattern
from codex_proxy.model import Verdict

_log = Logger()


def _token() -> str:
    return os.urandom(16).hex()


@attrs.frozen
class Secret:
    """
    One loaded secret; its C{repr} leaves the value out.
    """

    name: str
    hosts: DomainSet
    value: bytes = attrs.field(repr=False)


def read_secret(config: SecretConfig, environ: Mapping[str, str]) -> Secret:
    """
    Load one secret's value from its environment variable or file
    (blocking I/O: at start, or off the reactor thread on reload).

    @raise ConfigError: the variable is unset, the file is unsafe or
        unreadable, or the value is empty or holds a control character;
        the message names the secret's key, never the value.
    """
    kind, _, where = config.source.partition(":")
    key = f"{config.key}.source"
    if kind == "env":
        text = environ.get(where)
        if text is None:
            raise ConfigError(config.file, key, f"environment variable {where} is not set")
    else:
        try:
            text = read_private_file(where)
        except ValueError as e:
            raise ConfigError(config.file, key, str(e)) from None
    if not text:
        raise ConfigError(config.file, key, f"the value from {config.source} is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ConfigError(
            config.file, key, f"the value from {config.source} holds a control character"
        )
    hosts = DomainSet(parse_pattern(pattern) for pattern in config.hosts)
    return Secret(config.name, hosts, text.encode("utf-8"))


class Secrets:
    """
    The secrets of a running proxy.

    @ivar placeholders: each secret's placeholder by name, for the child
        environment and the ports file.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ, token: Callable[[], str] = _token) -> None:
        """
        @param token: 32 lowercase hex characters, random, per new secret.
        """
        self._environ = environ
        self._token = token
        self._tokens: Dict[str, str] = {}
        self._secrets: Tuple[Tuple[Secret, bytes], ...] = ()
        self.placeholders: Dict[str, str] = {}

    def read(self, configs: Iterable[SecretConfig]) -> Tuple[Secret, ...]:
        """
        Load the values of C{configs}; see L{read_secret}.
        """
        return tuple(read_secret(config, self._environ) for config in configs)

    def install(self, secrets: Tuple[Secret, ...]) -> None:
        """
        Use these secrets from now on; a secret keeps its placeholder for
        the life of the process, a new one gets a new placeholder.
        """
        placed = []
        for secret in secrets:
            token = self._tokens.setdefault(secret.name, self._token())
            placed.append((secret, _placeholders.placeholder(secret.name, token).encode("ascii")))
        self._secrets = tuple(placed)
        self.placeholders = {secret.name: text.decode("ascii") for secret, text in placed}
        if secrets:
            _log.info("secrets in force: {names}", names=", ".join(self.placeholders))

    def load(self, configs: Iterable[SecretConfig]) -> Secrets:
        """
        L{read} and L{install} (at start); returns C{self}.
        """
        self.install(self.read(configs))
        return self

    def substitute(self, verdict: Verdict, head: RequestHead) -> RequestHead:
        """
        C{head}, allowed by C{verdict}, with the placeholders of the secrets
        bound to its host replaced by their values in every header field
        value (the policy refused the request if one may not go there).
        """
        if not verdict.request.secrets:
            return head
        host = verdict.host
        replacements = {
            placeholder: secret.value
            for secret, placeholder in self._secrets
            if secret.hosts.match(host) is not None
        }
        if not replacements:
            return head
        return head.with_headers(_placeholders.substitute(head.headers, replacements))
