"""
The bypass corpus (C{data/bypass.toml}): spellings and tricks that try to
reach local or private destinations through the proxy (SPEC §5), with the
outcome each must get.

Pure: parses and validates TOML into frozen values. The in-memory tests and
C{codexproxy selftest} replay the same cases; a malformed corpus is an error
naming the case and the key.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import re
import tomllib
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import attrs

from codex_proxy.addresses import is_public, parse_ip_literal, parse_range
from codex_proxy.domains import InvalidHost, normalize_host
from codex_proxy.errors import ProxyError
from codex_proxy.model import IPAddress

#: HTTP 403 with this x-proxy-error, SOCKS5 REP 0x02.
BLOCKED = "blocked-by-allowlist"
#: HTTP 400, SOCKS5 REP 0x01: the host is refused before any policy step.
INVALID = "invalid-host"
#: HTTP 403 with this x-proxy-error, SOCKS5 REP 0x02: an answer lies in
#: C{denied_ranges} (SPEC §5.3).
DENIED = "blocked-by-denylist"

#: What each expectation looks like on each wire: (HTTP status, SOCKS REP).
OUTCOMES: Dict[str, Tuple[int, int]] = {
    BLOCKED: (403, 0x02),
    INVALID: (400, 0x01),
    DENIED: (403, 0x02),
}

_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_CASE_KEYS = ("name", "host", "why", "answers", "rebind_to", "expect")
_TOP_KEYS = ("allowed_domains", "allowed_ranges", "denied_ranges", "case")


class BypassError(ProxyError, ValueError):
    """
    The corpus is malformed; the message names the file, the case and the key.
    """


@attrs.frozen
class Case:
    """
    One bypass attempt.

    @ivar host: the host exactly as the client sends it.
    @ivar answers: what the resolver answers for C{host} (empty: the host
        is a literal or a name that is never resolved).
    @ivar rebind_to: what every later lookup answers (DNS rebinding).
    @ivar expect: L{BLOCKED}, L{INVALID} or L{DENIED}.
    """

    name: str
    host: str
    why: str
    answers: Tuple[IPAddress, ...] = ()
    rebind_to: Tuple[IPAddress, ...] = ()
    expect: str = BLOCKED

    @property
    def literal(self) -> Optional[IPAddress]:
        """
        The IP address C{host} spells, for a SOCKS5 request with an IP ATYP;
        C{None} for names and invalid hosts.
        """
        try:
            return parse_ip_literal(normalize_host(self.host))
        except InvalidHost:
            return None

    @property
    def resolved_name(self) -> Optional[str]:
        """
        The normalised name the proxy resolves for a resolver case.
        """
        return normalize_host(self.host) if self.answers else None

    @property
    def live(self) -> bool:
        """
        Whether the case may be replayed against a running proxy: no answer
        is public, so even a broken proxy could dial nothing but local
        addresses (rebinding needs a resolver that changes its answers).
        """
        return not self.rebind_to and all(not is_public(ip) for ip in self.answers)


@attrs.frozen
class Corpus:
    """
    The cases, and the allowlist and address ranges they are meant to run
    under.
    """

    allowed_domains: Tuple[str, ...]
    cases: Tuple[Case, ...]
    allowed_ranges: Tuple[str, ...] = ()
    denied_ranges: Tuple[str, ...] = ()

    def resolve_entries(self) -> List[str]:
        """
        The C{--resolve NAME=ADDR[,ADDR...]} entries that give a running
        proxy the answers of the live resolver cases, one per name.
        """
        entries: Dict[str, str] = {}
        for case in self.cases:
            if case.answers and case.live:
                name = case.resolved_name
                assert name is not None
                entries[name] = f"{name}=" + ",".join(str(ip) for ip in case.answers)
        return list(entries.values())


def load_corpus(data: Optional[bytes] = None, source: str = "bypass.toml") -> Corpus:
    """
    Parse the corpus C{data} (default: the one shipped in the package).

    @raise BypassError: the TOML or a case is malformed.
    """
    if data is None:
        data = (importlib.resources.files("codex_proxy") / "data" / "bypass.toml").read_bytes()
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BypassError(f"{source}: not valid TOML: {e}") from None
    _no_unknown_keys(document, _TOP_KEYS, source)
    allowed = document.get("allowed_domains", [])
    if not isinstance(allowed, list) or not all(isinstance(p, str) for p in allowed):
        raise BypassError(f"{source}: allowed_domains must be a list of strings")
    ranges = {key: _ranges(document, key, source) for key in ("allowed_ranges", "denied_ranges")}
    raw_cases = document.get("case")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise BypassError(f"{source}: no [[case]] tables")
    cases: List[Case] = []
    seen: Set[str] = set()
    resolved: Dict[str, Tuple[str, Tuple[IPAddress, ...]]] = {}
    for index, raw in enumerate(raw_cases):
        case = _case(raw, f"{source}: case[{index}]")
        where = f"{source}: case {case.name!r}"
        if case.name in seen:
            raise BypassError(f"{where}: key 'name': also used by an earlier case")
        seen.add(case.name)
        name = case.resolved_name
        if name is not None:
            other = resolved.setdefault(name, (case.name, case.answers))
            if other[1] != case.answers:
                raise BypassError(
                    f"{where}: key 'answers': {name} already answers"
                    f" {[str(ip) for ip in other[1]]} in case {other[0]!r}"
                )
        cases.append(case)
    return Corpus(tuple(allowed), tuple(cases), **ranges)


def _ranges(document: Mapping[str, Any], key: str, source: str) -> Tuple[str, ...]:
    """
    The canonical CIDRs of the top-level list C{key}.
    """
    value = document.get(key, [])
    if not isinstance(value, list):
        raise BypassError(f"{source}: {key} must be a list of CIDRs")
    try:
        return tuple(str(parse_range(item)) for item in value)
    except (AttributeError, ValueError) as e:
        raise BypassError(f"{source}: {key}: {e}") from None


def _case(raw: Any, where: str) -> Case:
    if not isinstance(raw, Mapping):
        raise BypassError(f"{where}: must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise BypassError(
            f"{where}: key 'name': expected lower-case letters, digits and '-', got {name!r}"
        )
    where = f"{where.rpartition(':')[0]}: case {name!r}"
    _no_unknown_keys(raw, _CASE_KEYS, where)
    host = _text(raw, "host", where)
    why = _text(raw, "why", where)
    answers = _addresses(raw, "answers", where)
    rebind_to = _addresses(raw, "rebind_to", where)
    expect = raw.get("expect", BLOCKED)
    if expect not in OUTCOMES:
        raise BypassError(
            f"{where}: key 'expect': expected one of {sorted(OUTCOMES)}, got {expect!r}"
        )
    case = Case(name, host, why, answers, rebind_to, expect)
    if rebind_to and not answers:
        raise BypassError(f"{where}: key 'rebind_to': needs 'answers' (the first lookup)")
    if answers:
        try:
            literal = parse_ip_literal(normalize_host(host))
        except InvalidHost as e:
            raise BypassError(f"{where}: key 'host': a resolver case needs a name: {e}")
        if literal is not None:
            raise BypassError(f"{where}: key 'answers': {host!r} is an IP literal, never resolved")
        if expect == INVALID:
            raise BypassError(f"{where}: key 'expect': a resolver case is never {INVALID}")
    return case


def _no_unknown_keys(table: Mapping[str, Any], known: Tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise BypassError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")


def _text(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BypassError(f"{where}: key {key!r}: expected a non-empty string, got {value!r}")
    return value


def _addresses(raw: Mapping[str, Any], key: str, where: str) -> Tuple[IPAddress, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or (key in raw and not value):
        raise BypassError(f"{where}: key {key!r}: expected a non-empty list of IP addresses")
    found = []
    for item in value:
        try:
            found.append(ipaddress.ip_address(item))
        except (TypeError, ValueError):
            raise BypassError(f"{where}: key {key!r}: {item!r} is not an IP address") from None
    return tuple(found)
