"""
Host normalisation, domain patterns and the compiled pattern index (SPEC §3).

Request hosts and patterns go through the same L{normalize_host}, so a
pattern and a host compare equal exactly when they name the same thing.
L{DomainSet} answers with hash lookups, one per label suffix of the host, so
its cost does not grow with the number of patterns.
"""

from __future__ import annotations

import enum
import functools
import re
from typing import Dict, Iterable, Iterator, Optional, Tuple

import attrs
import idna

from codex_proxy.addresses import ip_text, parse_ip_literal
from codex_proxy.errors import ProxyError

_MAX_NAME = 253
_MAX_LABEL = 63
_LABEL = re.compile(r"[a-z0-9_-]+")
# WHATWG "ends in a number": such a last label must be an IPv4 literal.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT = re.compile(r"[0-9]+")
_MAX_PORT = 65535


class InvalidHost(ProxyError, ValueError):
    """
    A host that is not a hostname or an IP literal.
    """


class PatternError(ProxyError, ValueError):
    """
    A domain pattern that cannot be used; the message says what is wrong.
    """


@functools.lru_cache(maxsize=4096)
def normalize_host(raw: str) -> str:
    """
    The canonical form of a host: trimmed, without brackets or port,
    lower-case, without trailing dots, Unicode labels as IDNA A-labels, IP
    literals in canonical text (C{127.1} becomes C{127.0.0.1}). Cached: the
    same few hosts come back on every request.

    @raise InvalidHost: the host is empty or breaks hostname syntax.
    """
    host = _strip_port(raw.strip())
    host = host.lower() if host.isascii() else _to_ascii(host)
    host = host.rstrip(".")
    if not host:
        raise InvalidHost(f"empty host in {raw!r}")
    ip = parse_ip_literal(host)
    if ip is not None:
        return ip_text(ip)
    if len(host) > _MAX_NAME:
        raise InvalidHost(f"host {raw!r} is longer than {_MAX_NAME} characters")
    labels = host.split(".")
    for label in labels:
        if not label:
            raise InvalidHost(f"empty label in {raw!r}")
        if len(label) > _MAX_LABEL:
            raise InvalidHost(f"label {label!r} is longer than {_MAX_LABEL} characters")
        if _LABEL.fullmatch(label) is None:
            raise InvalidHost(f"invalid character in {raw!r}")
    if _NUMERIC_LABEL.fullmatch(labels[-1]) is not None:
        raise InvalidHost(f"{raw!r} looks like an IPv4 address but is not one")
    return host


def _strip_port(host: str) -> str:
    """
    C{host} without one pair of brackets (which must hold an IPv6 literal)
    and without a C{:port}.
    """
    if host.startswith("["):
        inner, bracket, rest = host[1:].partition("]")
        if not bracket or ":" not in inner:
            raise InvalidHost(f"brackets in {host!r} do not hold an IPv6 address")
        if rest and not (rest[:1] == ":" and _PORT.fullmatch(rest[1:])):
            raise InvalidHost(f"unexpected {rest!r} after ']' in {host!r}")
        return inner
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        if _PORT.fullmatch(port) is None:
            raise InvalidHost(f"invalid port in {host!r}")
        return name
    return host


def _to_ascii(host: str) -> str:
    """
    UTS #46 mapping, then IDNA A-labels for the labels that are not ASCII.
    """
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        return ".".join(
            label if label.isascii() else idna.alabel(label).decode("ascii")
            for label in mapped.split(".")
        )
    except (idna.IDNAError, UnicodeError) as e:
        raise InvalidHost(f"{host!r} is not a valid internationalised name: {e}")


class PatternKind(enum.Enum):
    """
    What part of the domain tree a pattern covers.
    """

    EXACT = ""
    SUBDOMAINS = "*."
    APEX_AND_SUBDOMAINS = "**."
    #: C{*:PORT}: every host, on one port; denylists only (SPEC §3.1).
    EVERY_HOST = "*"


#: L{Pattern.port} of a pattern that matches every port.
ANY_PORT = 0


@attrs.frozen
class Pattern:
    """
    A parsed domain pattern.

    @ivar domain: the normalised domain (or canonical IP literal); empty
        for L{PatternKind.EVERY_HOST}.
    @ivar port: the one port the pattern matches, or L{ANY_PORT}.
    """

    kind: PatternKind
    domain: str
    port: int = ANY_PORT

    @property
    def text(self) -> str:
        """
        The canonical spelling: C{x}, C{*.x} or C{**.x}, followed by
        C{:PORT} when it names one (an IPv6 literal then in brackets), or
        C{*:PORT}.
        """
        if self.port == ANY_PORT:
            return self.kind.value + self.domain
        host = f"[{self.domain}]" if ":" in self.domain else self.domain
        return f"{self.kind.value}{host}:{self.port}"


def parse_pattern(text: str, *, deny: bool = False) -> Pattern:
    """
    Parse one allow/deny pattern (SPEC §3, §3.1), with an optional C{:PORT}.

    @param deny: the pattern is for a denylist, where C{*:PORT} (every
        host on that port) is allowed.
    @raise PatternError: the pattern is global, misplaces C{*}, puts a
        wildcard on an IP literal, has an invalid port, or is not a valid
        host.
    """
    stripped = text.strip()
    rest, port = _split_port(stripped, text)
    if rest.rstrip(".") in ("*", "**"):
        if rest == "*" and port != ANY_PORT:
            if deny:
                return Pattern(PatternKind.EVERY_HOST, "", port)
            raise PatternError(
                f"{text!r} matches every host: only denied_domains accepts '*:PORT'"
            )
        raise PatternError(f"the global pattern {stripped!r} is not allowed")
    kind = PatternKind.EXACT
    for wildcard in (PatternKind.APEX_AND_SUBDOMAINS, PatternKind.SUBDOMAINS):
        if rest.startswith(wildcard.value):
            kind = wildcard
            break
    rest = rest[len(kind.value) :]
    if "*" in rest:
        raise PatternError(
            f"'*' is only allowed as a leading '*.' or '**.' label in {text!r}"
        )
    try:
        domain = normalize_host(rest)
    except InvalidHost as e:
        raise PatternError(f"invalid pattern {text!r}: {e}") from None
    if kind is not PatternKind.EXACT and _is_ip_host(domain):
        raise PatternError(f"wildcards cannot apply to the IP address in {text!r}")
    return Pattern(kind, domain, port)


def _split_port(pattern: str, text: str) -> Tuple[str, int]:
    """
    The host part of the (stripped) C{pattern} and its port, L{ANY_PORT}
    when it names none. An IPv6 literal with a port is bracketed: without
    brackets, every colon belongs to the address.
    """
    if pattern.startswith("["):
        inner, bracket, rest = pattern.partition("]")
        if not (bracket and rest.startswith(":")):
            return pattern, ANY_PORT
        host, port = inner + bracket, rest[1:]
    elif pattern.count(":") == 1:
        host, _, port = pattern.partition(":")
    else:
        return pattern, ANY_PORT
    if _PORT.fullmatch(port) is None or not 1 <= int(port) <= _MAX_PORT:
        raise PatternError(f"invalid port in pattern {text!r} (expected 1-{_MAX_PORT})")
    return host, int(port)


def _is_ip_host(host: str) -> bool:
    """
    Whether the normalised C{host} is an IP literal: normalisation turns
    every host whose last label is numeric into an IPv4 literal or rejects
    it, and only IPv6 literals contain a colon.
    """
    return ":" in host or host.rpartition(".")[2].isdigit()


class _Index:
    """
    The patterns of one port (or of every port), by domain.
    """

    __slots__ = ("exact", "apex", "subdomains")

    def __init__(self) -> None:
        self.exact: Dict[str, Pattern] = {}
        self.apex: Dict[str, Pattern] = {}
        self.subdomains: Dict[str, Pattern] = {}

    def add(self, pattern: Pattern) -> None:
        if pattern.kind is PatternKind.EXACT:
            self.exact[pattern.domain] = pattern
        elif pattern.kind is PatternKind.APEX_AND_SUBDOMAINS:
            self.apex[pattern.domain] = pattern
            self.subdomains.setdefault(pattern.domain, pattern)
        else:
            # '*.d' is the narrower spelling of what '**.d' covers below d.
            self.subdomains[pattern.domain] = pattern

    def itself(self, host: str) -> Optional[Pattern]:
        """
        The exact or apex pattern naming C{host} itself.
        """
        return self.exact.get(host) or self.apex.get(host)


class DomainSet:
    """
    A compiled set of patterns, indexed by port and domain.

    The most specific pattern matching a host wins: an exact (or apex
    C{**.}) pattern for the host itself, else the wildcard on its longest
    matching suffix, else a C{*:PORT} pattern; at each step a pattern naming
    the request's port comes before one for every port. IP literal hosts
    match only exact patterns. Every step is a hash lookup, so the cost does
    not grow with the number of patterns (SPEC §3.1).
    """

    __slots__ = ("_patterns", "_any", "_ports", "_everyHost")

    def __init__(self, patterns: Iterable[Pattern]) -> None:
        self._patterns = tuple(dict.fromkeys(patterns))
        self._any = _Index()
        self._ports: Dict[int, _Index] = {}
        self._everyHost: Dict[int, Pattern] = {}
        for pattern in self._patterns:
            if pattern.kind is PatternKind.EVERY_HOST:
                self._everyHost[pattern.port] = pattern
            elif pattern.port == ANY_PORT:
                self._any.add(pattern)
            else:
                self._ports.setdefault(pattern.port, _Index()).add(pattern)

    def match(self, host: str, port: Optional[int] = None) -> Optional[Pattern]:
        """
        The most specific pattern matching the normalised C{host} on
        C{port}, if any; with C{port} C{None}, only a pattern that matches
        every port counts.
        """
        at = self._ports.get(port) if self._ports and port is not None else None
        every = self._any
        found = None if at is None else at.itself(host)
        if found is None:
            found = every.exact.get(host) or every.apex.get(host)
        if found is None and not _is_ip_host(host):
            below = every.subdomains
            dot = host.find(".")
            while found is None and dot != -1:
                suffix = host[dot + 1 :]
                if at is not None:
                    found = at.subdomains.get(suffix)
                if found is None:
                    found = below.get(suffix)
                dot = host.find(".", dot + 1)
        if found is None and self._everyHost and port is not None:
            found = self._everyHost.get(port)
        return found

    def exact(self, host: str, port: Optional[int] = None) -> bool:
        """
        Whether an exact pattern names the normalised C{host} on every port
        or on C{port}; only these unlock local targets (SPEC §5.1, §3.1).
        """
        if host in self._any.exact:
            return True
        at = None if port is None else self._ports.get(port)
        return at is not None and host in at.exact

    def __len__(self) -> int:
        return len(self._patterns)

    def __iter__(self) -> Iterator[Pattern]:
        return iter(self._patterns)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DomainSet):
            return NotImplemented
        return set(self._patterns) == set(other._patterns)

    def __hash__(self) -> int:
        return hash(frozenset(self._patterns))

    def __repr__(self) -> str:
        return f"DomainSet({[pattern.text for pattern in self._patterns]!r})"
